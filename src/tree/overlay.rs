//! A layer alone in overlayfs form, as container runtimes stack layers with the kernel's
//! overlayfs (podman's Additional Layer Store, containerd's snapshotters): a whiteout is a
//! 0/0 character device with the hidden name, an opaque directory carries the
//! `trusted.overlay.opaque` (and, for rootless overlay mounts with `userxattr`,
//! `user.overlay.opaque`) xattr set to `y`. Here only the entries change; `merge` of the
//! one layer then makes the tree, so every other rule stays in one place.

use std::collections::HashSet;

use bstr::BString;

use crate::index::{Entry, Kind, LayerIndex};

/// The xattrs that mark an opaque directory for overlayfs.
pub const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// `layer`'s entries in overlayfs form. Entry positions are kept (file data is found by
/// position), so a whiteout or opaque marker that becomes nothing is replaced by an opaque
/// marker on the root, which hides nothing in a tree of one layer; directories made opaque
/// that the layer does not list are added at the end.
pub fn overlay_form(layer: &LayerIndex) -> LayerIndex {
    let listed: HashSet<&[u8]> = (layer.entries.iter())
        .filter(|e| !matches!(e.kind, Kind::Whiteout | Kind::Opaque))
        .map(|e| e.path.as_slice())
        .collect();
    let opaque: HashSet<&[u8]> = (layer.entries.iter())
        .filter(|e| e.kind == Kind::Opaque)
        .map(|e| e.path.as_slice())
        .collect();
    let no_op = |e: &Entry| Entry {
        path: BString::default(),
        kind: Kind::Opaque,
        ..e.clone()
    };
    let mut entries: Vec<Entry> = (layer.entries.iter())
        .map(|e| match e.kind {
            // A name this layer also gives a file keeps the file: whiteouts hide lower
            // layers only.
            Kind::Whiteout if listed.contains(e.path.as_slice()) => no_op(e),
            Kind::Whiteout => Entry {
                kind: Kind::Char,
                size: 0,
                link: None,
                dev_major: 0,
                dev_minor: 0,
                xattrs: Vec::new(),
                sparse: Vec::new(),
                ..e.clone()
            },
            Kind::Opaque => no_op(e),
            Kind::Dir if opaque.contains(e.path.as_slice()) => marked(e.clone()),
            _ => e.clone(),
        })
        .collect();
    for path in opaque.iter().filter(|p| !listed.contains(*p)) {
        entries.push(marked(Entry {
            path: BString::from(*path),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            link: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            offset: 0,
            sparse: Vec::new(),
        }));
    }
    // Only the tree is made from it: reads go through the layer's own index.
    LayerIndex {
        entries,
        seek: None,
    }
}

/// `dir` with the opaque xattrs set.
fn marked(mut dir: Entry) -> Entry {
    dir.xattrs
        .retain(|(k, _)| !OPAQUE_XATTRS.contains(&k.as_str()));
    for k in OPAQUE_XATTRS {
        dir.xattrs.push((k.to_string(), b"y".to_vec()));
    }
    dir
}
