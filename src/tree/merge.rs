//! The overlay merge: layer indexes applied bottom first with the rules in the module doc
//! of [`super`] (whiteouts, opaque directories, replacement, hardlinks), whole or scoped to
//! the entries that decide one path. Builds a [`Tree`] through its own operations; no I/O.

use std::collections::BTreeMap;

use bstr::ByteSlice;

use super::{DataRef, DentryId, Meta, ROOT, Tree};
use crate::error::{Error, Result};
use crate::index::{Entry, Kind, LayerIndex, split};

/// Apply `layers` bottom first. `names[i]` names layer `i` in errors (its digest).
pub fn merge(layers: &[&LayerIndex], names: &[String]) -> Result<Tree> {
    merge_where(layers, names, |_| true)
}

/// The tree as far as `path` is concerned: only the entries that decide what `path` is (it,
/// its ancestors and what lies below it, whiteouts and opaque markers on them), so that one file can be looked up
/// without merging a whole image. `None` when a link is among them or when any entry is
/// written through one — those need other entries to resolve — and the whole merge is
/// needed. Links are symlinks and hard links alike: a hard link to a symlink is a symlink.
pub fn merge_for_path(
    layers: &[&LayerIndex],
    names: &[String],
    path: &[u8],
) -> Option<Result<Tree>> {
    // Entries below `path` count too: one inside a directory no layer lists makes it.
    let below = |a: &[u8], b: &[u8]| a.strip_prefix(b).is_some_and(|r| r.starts_with(b"/"));
    let on_path = |e: &Entry| {
        e.path.is_empty()
            || path == e.path.as_slice()
            || below(path, &e.path)
            || below(&e.path, path)
    };
    let all = || layers.iter().flat_map(|l| &l.entries);
    let is_link = |e: &Entry| matches!(e.kind, Kind::Symlink | Kind::Hardlink);
    if all().any(|e| on_path(e) && is_link(e)) {
        return None;
    }
    // An entry written through a link (`lib/x` with `lib -> usr/lib`) lands elsewhere than
    // its name says, maybe on this path: then only the whole merge knows. Each entry's
    // ancestors are looked up among the links: a few lookups per entry however many links
    // share a directory (a Debian userland has thousands under usr/, and matching each entry
    // against the links below its first component took 200 ms of a 0.45 s `cat`).
    let links: std::collections::HashSet<&[u8]> = all()
        .filter(|e| is_link(e))
        .map(|e| e.path.as_slice())
        .collect();
    if !links.is_empty() {
        let through =
            |p: &[u8]| (p.iter().enumerate()).any(|(i, &b)| b == b'/' && links.contains(&p[..i]));
        if all().any(|e| through(&e.path)) {
            return None;
        }
    }
    Some(merge_where(layers, names, on_path))
}

/// [`merge`] of the entries `keep` accepts (entry positions, and so data references, stay
/// those of the full layers).
fn merge_where(
    layers: &[&LayerIndex],
    names: &[String],
    keep: impl Fn(&Entry) -> bool,
) -> Result<Tree> {
    let mut t = Tree::new();
    for (li, layer) in layers.iter().enumerate() {
        // Whiteouts first: they hide lower layers only, wherever they sit in this layer's tar.
        apply_whiteouts(&mut t, layer, &keep);
        apply_entries(&mut t, li, layer, names, &keep)?;
    }
    count_links(&mut t);
    Ok(t)
}

/// Apply one layer's whiteouts and opaque markers (those `keep` accepts) to the tree of the
/// layers below it.
fn apply_whiteouts(t: &mut Tree, layer: &LayerIndex, keep: &impl Fn(&Entry) -> bool) {
    for e in layer.entries.iter().filter(|e| keep(e)) {
        match e.kind {
            Kind::Whiteout => {
                let (parent, name) = split(&e.path);
                if let Ok(dir) = t.resolve_dir(ROOT, parent, &mut 0)
                    && let Some(victim) = t.child(dir, name)
                {
                    t.remove(victim);
                }
            }
            Kind::Opaque => {
                let (parent, name) = split(&e.path);
                let dir = if e.path.is_empty() {
                    Some(ROOT)
                } else {
                    t.resolve_dir(ROOT, parent, &mut 0)
                        .ok()
                        .and_then(|p| t.child(p, name))
                };
                if let Some(d) = dir.filter(|d| t.kind(*d) == Kind::Dir) {
                    t.dentries[d as usize].children = Some(BTreeMap::new());
                }
            }
            _ => {}
        }
    }
}

/// Add one layer's entries other than whiteouts (those `keep` accepts), each replacing what
/// was at its path. `li` is the layer's position, for data references and, with `names`,
/// for errors.
fn apply_entries(
    t: &mut Tree,
    li: usize,
    layer: &LayerIndex,
    names: &[String],
    keep: &impl Fn(&Entry) -> bool,
) -> Result<()> {
    let fail = |e: &Entry, reason: String| {
        Error::malformed(
            format!(
                "layer {} ({})",
                li + 1,
                names.get(li).map(String::as_str).unwrap_or("?")
            ),
            format!("entry {:?}: {reason}", e.path.as_bstr()),
        )
    };
    // Parents resolved in this layer, by path: most entries share a parent with many
    // others. Forgotten whenever an entry replaces something that is not a plain file —
    // the only way a resolved path can come to mean another directory.
    let mut parents: std::collections::HashMap<&[u8], DentryId> = std::collections::HashMap::new();
    for (ei, e) in layer.entries.iter().enumerate() {
        if matches!(e.kind, Kind::Whiteout | Kind::Opaque) || !keep(e) {
            continue;
        }
        if e.path.is_empty() {
            if e.kind == Kind::Dir {
                t.inodes[0].meta = Meta::from_entry(e);
            }
            continue;
        }
        let (parent, name) = split(&e.path);
        let dir = match parents.get(parent) {
            Some(&d) => d,
            None => {
                let d = t
                    .resolve_or_create_dir(parent)
                    .map_err(|r| fail(e, format!("its parent cannot be made a directory: {r}")))?;
                parents.insert(parent, d);
                d
            }
        };
        let existing = t.child(dir, name);
        if existing.is_some_and(|d| t.kind(d) != Kind::File) && e.kind != Kind::Dir
            || existing.is_some_and(|d| t.kind(d) != Kind::Dir) && e.kind == Kind::Dir
        {
            parents.clear();
        }
        let data = DataRef {
            layer: li as u32,
            entry: ei as u32,
        };
        place(t, dir, name, existing, e, data).map_err(|r| fail(e, r))?;
    }
    Ok(())
}

/// Put entry `e` at `name` in `dir`, where `existing` is: a directory keeps its children
/// when replaced by a directory, a hardlink shares its target's inode, anything else is a
/// new inode (`data` is where a file's bytes are). The error is the reason, for the caller
/// to name the entry.
fn place(
    t: &mut Tree,
    dir: DentryId,
    name: &[u8],
    existing: Option<DentryId>,
    e: &Entry,
    data: DataRef,
) -> std::result::Result<(), String> {
    match e.kind {
        Kind::Dir => match existing {
            Some(d) if t.kind(d) == Kind::Dir => {
                let ino = t.dentries[d as usize].inode;
                t.inodes[ino as usize].meta = Meta::from_entry(e);
            }
            _ => {
                if let Some(d) = existing {
                    t.remove(d);
                }
                let ino = t.new_inode(Meta::from_entry(e), None);
                t.add(dir, name, ino);
            }
        },
        Kind::Hardlink => {
            let target = link_target(t, e)?;
            if existing == Some(target) {
                return Ok(());
            }
            let ino = t.dentries[target as usize].inode;
            if let Some(d) = existing {
                t.remove(d);
            }
            t.add(dir, name, ino);
        }
        _ => {
            if let Some(d) = existing {
                t.remove(d);
            }
            let data = (e.kind == Kind::File).then_some(data);
            let ino = t.new_inode(Meta::from_entry(e), data);
            t.add(dir, name, ino);
        }
    }
    Ok(())
}

/// The dentry hardlink `e` points at, which must exist and not be a directory.
fn link_target(t: &Tree, e: &Entry) -> std::result::Result<DentryId, String> {
    let target_path = e.link.as_deref().map_or(&b""[..], |l| l.as_slice());
    let (tp, tn) = split(target_path);
    let target = t
        .resolve_dir(ROOT, tp, &mut 0)
        .ok()
        .and_then(|d| t.child(d, tn))
        .ok_or_else(|| {
            format!(
                "hardlink to {:?}, which does not exist",
                target_path.as_bstr()
            )
        })?;
    if t.kind(target) == Kind::Dir {
        return Err(format!("hardlink to directory {:?}", target_path.as_bstr()));
    }
    Ok(target)
}

/// Link counts as Linux has them: a name each for a file; for a directory its entry, its
/// own `.` and each subdirectory's `..`.
fn count_links(t: &mut Tree) {
    for ino in &mut t.inodes {
        ino.nlink = 0;
    }
    t.inodes[0].nlink = 2;
    for d in t.walk() {
        let de = &t.dentries[d as usize];
        let (ino, parent) = (
            de.inode as usize,
            t.dentries[de.parent as usize].inode as usize,
        );
        if t.inodes[ino].meta.kind == Kind::Dir {
            t.inodes[ino].nlink += 2;
            t.inodes[parent].nlink += 1;
        } else {
            t.inodes[ino].nlink += 1;
        }
    }
}
