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

use std::collections::BTreeMap;

use bstr::{BStr, BString, ByteSlice};

use crate::error::{Error, Result};
use crate::index::{Entry, Kind, LayerIndex, split};

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
    // its name says, maybe on this path: then only the whole merge knows.
    // Links by their first path component: one lookup per entry instead of one per
    // ancestor (this check is most of a scoped merge's cost).
    let first = |p: &[u8]| p.find_byte(b'/').unwrap_or(p.len());
    let mut links: std::collections::HashMap<&[u8], Vec<&[u8]>> = std::collections::HashMap::new();
    for e in all().filter(|e| is_link(e)) {
        links
            .entry(&e.path[..first(&e.path)])
            .or_default()
            .push(&e.path);
    }
    if !links.is_empty() {
        let through = |p: &[u8]| {
            links.get(&p[..first(p)]).is_some_and(|links| {
                links
                    .iter()
                    .any(|l| p.len() > l.len() && p.starts_with(l) && p[l.len()] == b'/')
            })
        };
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

#[cfg(test)]
mod tests;

mod overlay;
pub use overlay::{OPAQUE_XATTRS, overlay_form};
