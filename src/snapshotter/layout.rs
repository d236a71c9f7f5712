//! Where snapshots live on disk and the mounts that stack them, as containerd's overlayfs
//! snapshotter lays them out — so that containerd and runc see what they expect — with one
//! difference: a layer served lazily is a directory of the layer store mounted at
//! `<root>/layers` (`fuse::store`'s layout, `<base64 of the reference>/<digest>/diff`),
//! reached through a symbolic link where an unpacked snapshot has its tree, so that every
//! `lowerdir` entry is a short path without the `:` of a digest (overlayfs's separator).
//!
//! ```text
//! <root>/state.redb            the records (state.rs)
//! <root>/status                counts: layers served lazily, fallbacks and their reasons
//! <root>/snapshots/<id>/fs     an ordinary snapshot's tree (the upper dir of an active one),
//!                              or a link to a lazy layer's directory in the layer store
//! <root>/snapshots/<id>/work   overlayfs's work dir (active snapshots)
//! <root>/layers/               the layer store (FUSE), one directory per lazy layer
//! ```

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::state::{Kind, Record, Remote};

/// A mount as containerd's `types.Mount` carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

pub fn snapshots_dir(root: &Path) -> PathBuf {
    root.join("snapshots")
}

pub fn layers_dir(root: &Path) -> PathBuf {
    root.join("layers")
}

pub fn snapshot_dir(root: &Path, id: u64) -> PathBuf {
    snapshots_dir(root).join(id.to_string())
}

/// The directory holding the tree a committed snapshot contributes to the ones above it.
pub fn lower_dir(root: &Path, r: &Record) -> PathBuf {
    snapshot_dir(root, r.id).join("fs")
}

/// A lazy layer's tree in the layer store (URL-safe base64: no `/` in the name).
pub fn layer_dir(root: &Path, remote: &Remote) -> PathBuf {
    layers_dir(root)
        .join(base64::engine::general_purpose::URL_SAFE.encode(&remote.reference))
        .join(&remote.layer)
        .join("diff")
}

/// The mounts of snapshot `r`, given its ancestors' lower dirs, nearest first.
pub fn mounts(root: &Path, r: &Record, parents: &[PathBuf]) -> Vec<Mount> {
    let dir = snapshot_dir(root, r.id);
    let bind = |source: &Path, mode: &str| Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec![mode.into(), "rbind".into()],
    };
    let lowerdir = || {
        let dirs: Vec<String> = parents.iter().map(|p| p.display().to_string()).collect();
        format!("lowerdir={}", dirs.join(":"))
    };
    match (r.kind, parents) {
        (Kind::Active, []) => vec![bind(&dir.join("fs"), "rw")],
        (_, []) => vec![bind(&dir.join("fs"), "ro")],
        // overlayfs refuses a single lower dir without an upper one.
        (Kind::View, [one]) => vec![bind(one, "ro")],
        (Kind::View | Kind::Committed, _) => vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["index=off".into(), lowerdir()],
        }],
        (Kind::Active, _) => vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", dir.join("work").display()),
                format!("upperdir={}", dir.join("fs").display()),
                lowerdir(),
            ],
        }],
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted once, as
/// containerd's overlayfs snapshotter measures a snapshot.
pub fn usage(dir: &Path) -> std::io::Result<(i64, i64)> {
    let (mut size, mut seen) = (0i64, HashSet::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let meta = std::fs::symlink_metadata(&d)?;
        if seen.insert((meta.dev(), meta.ino())) {
            size += meta.blocks() as i64 * 512;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let m = e.metadata()?;
                if m.is_dir() {
                    stack.push(e.path());
                } else if seen.insert((m.dev(), m.ino())) {
                    size += m.blocks() as i64 * 512;
                }
            }
        }
    }
    Ok((size, seen.len() as i64))
}
