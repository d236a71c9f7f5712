//! The merged root filesystem of an image: layer indexes applied bottom first with the OCI
//! overlay rules, as a table of directory entries and inodes. Pure data — no I/O — so `pull`
//! and `mount` share one definition of what an image contains.
//!
//! Rules (OCI image spec, "changesets"): a layer's whiteouts act on the layers below it only,
//! whatever their place in its tar; an entry replaces what was at its path (a directory over a
//! directory merges, taking the new metadata); a hardlink shares the inode of its target *as
//! it is when the link is applied*, so later changes to the target path do not touch it.
//! Parent paths are resolved through symlinks scoped to the image root (as umoci and Docker
//! do: `/lib -> usr/lib` then `lib/x` lands in `usr/lib/x`); nothing resolves outside it.
//!
//! This file is the tree and its operations (paths resolved, entries added and removed);
//! `merge.rs` applies the rules with them, `overlay.rs` gives one layer in overlayfs form.

use std::collections::BTreeMap;

use bstr::{BStr, BString, ByteSlice};

use crate::error::Result;
use crate::index::{Entry, Kind, split};

pub type DentryId = u32;
pub type InodeId = u32;

/// The root directory's entry and inode.
pub const ROOT: DentryId = 0;

/// How deep symlinks may chain while resolving one path (Linux's limit).
const MAX_SYMLINKS: u32 = 40;

/// The metadata of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    /// Symlink target.
    pub link: Option<BString>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// A directory no layer lists, made because something was put inside it. It has no
    /// recorded mtime: writers leave the time it was created, as umoci and tar do.
    pub implicit: bool,
}

impl Meta {
    fn from_entry(e: &Entry) -> Meta {
        Meta {
            kind: e.kind,
            // Linux shows every symlink as rwxrwxrwx, whatever its tar header said.
            mode: if e.kind == Kind::Symlink {
                0o777
            } else {
                e.mode
            },
            // A symlink's size is its target's length, as lstat(2) gives it.
            size: match &e.link {
                Some(l) if e.kind == Kind::Symlink => l.len() as u64,
                _ => e.size,
            },
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            link: e.link.clone(),
            dev_major: e.dev_major,
            dev_minor: e.dev_minor,
            xattrs: e.xattrs.clone(),
            implicit: false,
        }
    }

    fn implicit_dir() -> Meta {
        Meta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            implicit: true,
        }
    }
}

/// Where a regular file's bytes are: entry `entry` of layer `layer` (positions in the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRef {
    pub layer: u32,
    pub entry: u32,
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub meta: Meta,
    pub data: Option<DataRef>,
    /// Link count as Linux gives it, set by [`merge`]: the names of a file (hard links); for
    /// a directory, 2 and one per subdirectory.
    pub nlink: u32,
}

#[derive(Clone, Debug)]
pub struct Dentry {
    pub name: BString,
    pub parent: DentryId,
    pub inode: InodeId,
    /// Children by name, for directories.
    pub children: Option<BTreeMap<BString, DentryId>>,
}

/// The merged tree. Dead entries (deleted by later layers) stay in `dentries` but are
/// unreachable from [`ROOT`]; walk from the root with [`Tree::walk`].
#[derive(Clone, Debug)]
pub struct Tree {
    pub dentries: Vec<Dentry>,
    pub inodes: Vec<Inode>,
}

impl Tree {
    fn new() -> Tree {
        Tree {
            dentries: vec![Dentry {
                name: BString::default(),
                parent: ROOT,
                inode: 0,
                children: Some(BTreeMap::new()),
            }],
            inodes: vec![Inode {
                meta: Meta::implicit_dir(),
                data: None,
                nlink: 1,
            }],
        }
    }

    pub fn inode_of(&self, d: DentryId) -> &Inode {
        &self.inodes[self.dentries[d as usize].inode as usize]
    }

    fn kind(&self, d: DentryId) -> Kind {
        self.inode_of(d).meta.kind
    }

    pub fn children(&self, d: DentryId) -> impl Iterator<Item = DentryId> + '_ {
        self.dentries[d as usize]
            .children
            .iter()
            .flat_map(|c| c.values().copied())
    }

    /// The path of a live entry, relative to the root.
    pub fn path(&self, mut d: DentryId) -> BString {
        let mut parts: Vec<&[u8]> = Vec::new();
        while d != ROOT {
            parts.push(&self.dentries[d as usize].name);
            d = self.dentries[d as usize].parent;
        }
        parts.reverse();
        BString::from(bstr::join("/", parts))
    }

    /// Every live entry below the root, parents before children, siblings by name.
    pub fn walk(&self) -> Vec<DentryId> {
        let mut out = Vec::new();
        let mut stack: Vec<DentryId> = self.children(ROOT).collect();
        stack.reverse();
        while let Some(d) = stack.pop() {
            out.push(d);
            let before = stack.len();
            stack.extend(self.children(d));
            stack[before..].reverse();
        }
        out
    }

    /// Look up a path without following a symlink in its last component.
    pub fn lookup(&self, path: &[u8]) -> Option<DentryId> {
        if path.is_empty() {
            return Some(ROOT);
        }
        let (parent, name) = split(path);
        let dir = self.resolve_dir(ROOT, parent, &mut 0).ok()?;
        self.child(dir, name)
    }

    /// Look up a path following symlinks in every component, the last one too, as `open`
    /// does — scoped to the image root. The error says why, for a user.
    pub fn lookup_following(&self, path: &[u8]) -> Result<DentryId, String> {
        let why = |e: Unresolved| match e {
            Unresolved::Missing { .. } => "no such file or directory in the image".to_string(),
            Unresolved::Other(why) => why,
        };
        let mut depth = 0;
        let (mut base, mut path) = (ROOT, BString::from(path));
        loop {
            let (parent, name) = split(&path);
            if matches!(name, b"" | b"." | b"..") {
                return self.resolve_dir(base, &path, &mut depth).map_err(why);
            }
            let dir = self.resolve_dir(base, parent, &mut depth).map_err(why)?;
            let d = self
                .child(dir, name)
                .ok_or_else(|| "no such file or directory in the image".to_string())?;
            if self.kind(d) != Kind::Symlink {
                return Ok(d);
            }
            depth += 1;
            if depth > MAX_SYMLINKS {
                return Err("too many levels of symbolic links".into());
            }
            let target = self.inode_of(d).meta.link.clone().unwrap_or_default();
            base = if target.starts_with(b"/") { ROOT } else { dir };
            path = target;
        }
    }

    fn add(&mut self, parent: DentryId, name: &[u8], inode: InodeId) -> DentryId {
        let id = self.dentries.len() as DentryId;
        let is_dir = self.inodes[inode as usize].meta.kind == Kind::Dir;
        self.dentries.push(Dentry {
            name: BString::from(name),
            parent,
            inode,
            children: is_dir.then(BTreeMap::new),
        });
        self.dentries[parent as usize]
            .children
            .as_mut()
            .expect("parent is a directory")
            .insert(BString::from(name), id);
        id
    }

    fn new_inode(&mut self, meta: Meta, data: Option<DataRef>) -> InodeId {
        self.inodes.push(Inode {
            meta,
            data,
            nlink: 0,
        });
        (self.inodes.len() - 1) as InodeId
    }

    /// Resolve `path` (relative to `start`) to a directory, following symlinks scoped to the
    /// root (`..` stops at the root, absolute targets start from it).
    fn resolve_dir(
        &self,
        start: DentryId,
        path: &[u8],
        depth: &mut u32,
    ) -> Result<DentryId, Unresolved> {
        let comps: Vec<&[u8]> = path.split_str("/").collect();
        let rest_after = |i: usize| BString::from(bstr::join("/", &comps[i + 1..]));
        let mut cur = start;
        for (i, comp) in comps.iter().enumerate() {
            match *comp {
                b"" | b"." => continue,
                b".." => {
                    cur = self.dentries[cur as usize].parent;
                    continue;
                }
                _ => {}
            }
            let Some(c) = self.child(cur, comp) else {
                return Err(Unresolved::Missing {
                    dir: cur,
                    name: BString::from(*comp),
                    rest: rest_after(i),
                });
            };
            cur = match self.kind(c) {
                Kind::Dir => c,
                Kind::Symlink => {
                    *depth += 1;
                    if *depth > MAX_SYMLINKS {
                        return Err(Unresolved::Other(
                            "too many levels of symbolic links".into(),
                        ));
                    }
                    let target: &[u8] = self.inode_of(c).meta.link.as_deref().map_or(b"", |l| l);
                    let base = if target.starts_with(b"/") { ROOT } else { cur };
                    // Something missing inside the target: what follows it here comes after.
                    self.resolve_dir(base, target, depth).map_err(|e| match e {
                        Unresolved::Missing {
                            dir,
                            name,
                            mut rest,
                        } => Unresolved::Missing {
                            dir,
                            name,
                            rest: {
                                rest.push(b'/');
                                rest.extend_from_slice(&rest_after(i));
                                rest
                            },
                        },
                        other => other,
                    })?
                }
                _ => {
                    return Err(Unresolved::Other(format!(
                        "{:?} is not a directory",
                        comp.as_bstr()
                    )));
                }
            };
        }
        Ok(cur)
    }

    /// [`Tree::resolve_dir`], making missing directories (also inside symlink targets). Each
    /// one is made where resolution stopped, and resolution goes on from there.
    fn resolve_or_create_dir(&mut self, path: &[u8]) -> Result<DentryId, String> {
        let (mut start, mut path) = (ROOT, BString::from(path));
        let mut depth = 0;
        loop {
            match self.resolve_dir(start, &path, &mut depth) {
                Ok(d) => return Ok(d),
                Err(Unresolved::Missing { dir, name, rest }) => {
                    let ino = self.new_inode(Meta::implicit_dir(), None);
                    start = self.add(dir, &name, ino);
                    // Below a directory just made nothing exists: the rest is made in one
                    // pass (resolving it again per component would be quadratic in depth).
                    if !rest.split_str("/").any(|c| c == b"." || c == b"..") {
                        for c in rest.split_str("/").filter(|c| !c.is_empty()) {
                            let ino = self.new_inode(Meta::implicit_dir(), None);
                            start = self.add(start, c, ino);
                        }
                        return Ok(start);
                    }
                    path = rest;
                }
                Err(Unresolved::Other(why)) => return Err(why),
            }
        }
    }

    /// Unlink `d` from its parent; its subtree becomes unreachable.
    fn remove(&mut self, d: DentryId) {
        let Dentry { parent, name, .. } = self.dentries[d as usize].clone();
        if let Some(c) = self.dentries[parent as usize].children.as_mut() {
            c.remove(&name);
        }
    }

    fn child(&self, dir: DentryId, name: &[u8]) -> Option<DentryId> {
        self.dentries[dir as usize]
            .children
            .as_ref()?
            .get(BStr::new(name))
            .copied()
    }
}

/// Why a path did not resolve to a directory.
enum Unresolved {
    /// `name` is missing in `dir`; `rest` is what was still to resolve after it.
    Missing {
        dir: DentryId,
        name: BString,
        rest: BString,
    },
    Other(String),
}

#[cfg(test)]
mod tests;

mod merge;
mod overlay;
pub use merge::{merge, merge_for_path};
pub use overlay::{OPAQUE_XATTRS, overlay_form};
