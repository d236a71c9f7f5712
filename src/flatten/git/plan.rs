//! Planning the commits: the merged tree of each layer prefix listed as (mode, blob, path),
//! each staging file and symlink target becoming one blob, shared by every commit that
//! holds it; and the check that no tree holds a path git refuses.

use std::collections::HashMap;
use std::path::PathBuf;

use bstr::BString;

use super::names::git_refuses;
use crate::error::{Error, Result};
use crate::index::Kind;
use crate::tree::Tree;

/// The file mode git records for a regular file: executable if its owner may execute it
/// (git's own rule, so that `git status` agrees with the work tree).
fn blob_mode(mode: u32) -> &'static str {
    if mode & 0o100 != 0 {
        "100755"
    } else {
        "100644"
    }
}

/// The content of one blob.
pub(super) enum Blob {
    /// A staging file, `size` bytes long by the tree.
    File { path: PathBuf, size: u64 },
    /// A symlink's target.
    Link(BString),
}

impl Blob {
    pub(super) fn size(&self) -> u64 {
        match self {
            Blob::File { size, .. } => *size,
            Blob::Link(t) => t.len() as u64,
        }
    }
}

/// What the commit of one layer prefix lists: (git file mode, blob mark, path).
pub(super) type Listing = Vec<(&'static str, u32, BString)>;

/// The blobs of every commit, each once, and each commit's listing.
#[derive(Default)]
pub(super) struct Plan {
    /// Blob `i` gets mark `i + 1`.
    pub(super) blobs: Vec<Blob>,
    files: HashMap<(u32, u32), u32>,
    links: HashMap<BString, u32>,
    pub(super) commits: Vec<Listing>,
}

impl Plan {
    fn add(&mut self, blob: Blob) -> u32 {
        self.blobs.push(blob);
        self.blobs.len() as u32
    }

    /// Add the commit of tree `t`.
    pub(super) fn commit(&mut self, t: &Tree, staging: &[PathBuf]) {
        let mut listing = Vec::new();
        for d in t.walk() {
            let inode = t.inode_of(d);
            let (mode, mark) = match inode.meta.kind {
                Kind::File => {
                    let data = inode.data.expect("regular files have data");
                    let key = (data.layer, data.entry);
                    let mark = match self.files.get(&key) {
                        Some(&m) => m,
                        None => {
                            let m = self.add(Blob::File {
                                path: staging[data.layer as usize].join(data.entry.to_string()),
                                size: inode.meta.size,
                            });
                            self.files.insert(key, m);
                            m
                        }
                    };
                    (blob_mode(inode.meta.mode), mark)
                }
                Kind::Symlink => {
                    let target = inode.meta.link.clone().unwrap_or_default();
                    let mark = match self.links.get(&target) {
                        Some(&m) => m,
                        None => {
                            let m = self.add(Blob::Link(target.clone()));
                            self.links.insert(target, m);
                            m
                        }
                    };
                    ("120000", mark)
                }
                // Directories are implied by their files; git has no devices or fifos.
                _ => continue,
            };
            listing.push((mode, mark, t.path(d)));
        }
        self.commits.push(listing);
    }
}

/// Refuse a tree holding a path git would not check out.
pub(super) fn check_names(t: &Tree) -> Result<()> {
    for d in t.walk() {
        let symlink = t.inode_of(d).meta.kind == Kind::Symlink;
        if git_refuses(&t.dentries[d as usize].name, symlink) {
            return Err(Error::Unsupported {
                what: "image for --git (it holds a path git refuses to record: a .git of its \
                       own, or a name NTFS would read as one)"
                    .into(),
                value: t.path(d).to_string(),
            });
        }
    }
    Ok(())
}
