//! Putting inodes on disk: file metadata during extraction, and the final tree by rename.
//! Failures a user can live with (ownership when not root, an xattr the filesystem refuses,
//! device nodes without privilege) are collected as warnings, each said once.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};

use crate::error::{IoContext, Result};
use crate::index::{Entry, Kind};
use crate::tree::{DentryId, Inode, InodeId, Meta, ROOT, Tree};

/// Warnings said once each, shared by all workers.
#[derive(Clone, Default)]
pub struct Warnings(Arc<Mutex<(HashSet<String>, Vec<String>)>>);

impl Warnings {
    pub fn new() -> Warnings {
        Warnings::default()
    }

    /// Record `msg` unless a warning with the same `key` was recorded already.
    pub fn once(&self, key: &str, msg: impl FnOnce() -> String) {
        let mut g = self.0.lock().unwrap();
        if g.0.insert(key.to_string()) {
            let m = msg();
            tracing::warn!("{m}");
            g.1.push(m);
        }
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().1)
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The process umask, read once. Reading it means setting it, so this is called before any
/// worker starts ([`init`]).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let old = rustix::process::umask(Mode::empty());
        rustix::process::umask(old);
        old.bits()
    })
}

/// Read process-wide settings before workers start.
pub fn init() {
    umask();
}

/// Whether a file we created (owned by us, with `mode` less the umask) needs `chown`.
fn needs_chown(uid: u32, gid: u32) -> bool {
    uid != rustix::process::geteuid().as_raw() || gid != rustix::process::getegid().as_raw()
}

/// Whether `mode` survives creation as is: not cut by the umask, not cleared by a chown, and
/// without setuid/setgid (which the kernel clears when a file is written by a process
/// without CAP_FSETID, as a non-root pull is).
fn needs_chmod(mode: u32, chowned: bool) -> bool {
    chowned || mode & umask() != 0 || mode & 0o6000 != 0
}

/// Open options that create a new file with `mode` (less the umask) in one system call.
pub fn create_options(mode: u32) -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true).mode(mode);
    o
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn not_root_warning(w: &Warnings) {
    w.once("owner", || {
        "not running as root: files are owned by you, not by the image's users".into()
    });
}

/// One warning per namespace and reason, not per name: an image may carry thousands.
fn xattr_warning(w: &Warnings, name: &str, e: rustix::io::Errno) {
    let namespace = name.split_once('.').map_or(name, |(ns, _)| ns);
    w.once(&format!("xattr {namespace} {e}"), || {
        format!(
            "the target filesystem refused xattr {name} ({e}); continuing without it and \
             without any other {namespace}.* xattr it refuses so"
        )
    });
}

/// Owner, mode, xattrs and mtime of a regular file just written through
/// [`create_options`]`(e.mode)`. Calls only what creation did not already get right: most
/// files need nothing but their mtime.
pub fn file_meta(f: &File, path: &Path, e: &Entry, w: &Warnings) -> Result<()> {
    let mut chowned = false;
    if needs_chown(e.uid, e.gid) {
        if is_root() {
            rustix::fs::fchown(
                f,
                Some(rustix::fs::Uid::from_raw(e.uid)),
                Some(rustix::fs::Gid::from_raw(e.gid)),
            )
            .map_err(std::io::Error::from)
            .ctx(|| format!("chown {}", path.display()))?;
            chowned = true;
        } else {
            not_root_warning(w);
        }
    }
    // After chown, which clears setuid/setgid.
    if needs_chmod(e.mode, chowned) {
        rustix::fs::fchmod(f, Mode::from_raw_mode(e.mode))
            .map_err(std::io::Error::from)
            .ctx(|| format!("chmod {}", path.display()))?;
    }
    for (name, value) in &e.xattrs {
        if let Err(err) = rustix::fs::fsetxattr(f, name.as_str(), value, XattrFlags::empty()) {
            xattr_warning(w, name, err);
        }
    }
    rustix::fs::futimens(f, &times(e.mtime))
        .map_err(std::io::Error::from)
        .ctx(|| format!("setting the mtime of {}", path.display()))
}

/// Owner, mode, xattrs and mtime of a path that is not a regular file (not following it).
/// `created_mode` is the mode it was created with, before the umask.
fn path_meta(p: &Path, m: &Meta, created_mode: u32, w: &Warnings) -> Result<()> {
    let io = |e: rustix::io::Errno| std::io::Error::from(e);
    let mut chowned = false;
    if needs_chown(m.uid, m.gid) {
        if is_root() {
            rustix::fs::chownat(
                CWD,
                p,
                Some(rustix::fs::Uid::from_raw(m.uid)),
                Some(rustix::fs::Gid::from_raw(m.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(io)
            .ctx(|| format!("chown {}", p.display()))?;
            chowned = true;
        } else {
            not_root_warning(w);
        }
    }
    if m.kind != Kind::Symlink && (created_mode != m.mode || needs_chmod(m.mode, chowned)) {
        rustix::fs::chmodat(CWD, p, Mode::from_raw_mode(m.mode), AtFlags::empty())
            .map_err(io)
            .ctx(|| format!("chmod {}", p.display()))?;
    }
    for (name, value) in &m.xattrs {
        if let Err(err) = rustix::fs::lsetxattr(p, name.as_str(), value, XattrFlags::empty()) {
            xattr_warning(w, name, err);
        }
    }
    if m.implicit {
        return Ok(());
    }
    rustix::fs::utimensat(CWD, p, &times(m.mtime), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io)
        .ctx(|| format!("setting the mtime of {}", p.display()))
}

/// Directories are made writable by us while they are filled; their real mode comes last.
fn dir_create_mode(mode: u32) -> u32 {
    mode | 0o700
}

/// Build `tree` at `root` (which must not exist), moving regular files out of `staging` (each
/// staging file is used up).
pub fn materialize(tree: &Tree, staging: &[PathBuf], root: &Path, w: &Warnings) -> Result<()> {
    std::fs::create_dir(root).ctx(|| format!("creating {}", root.display()))?;
    let mut paths: Vec<Option<PathBuf>> = vec![None; tree.dentries.len()];
    paths[ROOT as usize] = Some(root.to_path_buf());
    let mut placed: HashMap<InodeId, PathBuf> = HashMap::new();
    let order = tree.walk();
    for &d in &order {
        let de = &tree.dentries[d as usize];
        let p = paths[de.parent as usize]
            .as_ref()
            .expect("parents come first")
            .join(crate::index::as_path(&de.name));
        let inode = &tree.inodes[de.inode as usize];
        let kind = inode.meta.kind;
        if kind != Kind::Dir
            && let Some(first) = placed.get(&de.inode)
        {
            std::fs::hard_link(first, &p).ctx(|| format!("linking {}", p.display()))?;
            paths[d as usize] = Some(p);
            continue;
        }
        if !create(&p, inode, staging, w)? {
            continue;
        }
        if kind != Kind::Dir {
            placed.insert(de.inode, p.clone());
        }
        paths[d as usize] = Some(p);
    }
    dir_metas(tree, &order, &paths, w)
}

/// Create `inode` at `p`: a directory (its metadata comes last, [`dir_metas`]), a regular
/// file moved from its staging file, or a symlink or node with its metadata. Returns false
/// when a device node was skipped for want of privilege.
fn create(p: &Path, inode: &Inode, staging: &[PathBuf], w: &Warnings) -> Result<bool> {
    let m = &inode.meta;
    match m.kind {
        Kind::Dir => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(dir_create_mode(m.mode))
                .create(p)
                .ctx(|| format!("creating {}", p.display()))?
        }
        Kind::File => {
            let data = inode.data.expect("regular files have data");
            let from = staging[data.layer as usize].join(data.entry.to_string());
            std::fs::rename(&from, p).ctx(|| format!("placing {}", p.display()))?;
        }
        Kind::Symlink => {
            let target = m.link.as_deref().map_or(&b""[..], |l| l);
            std::os::unix::fs::symlink(crate::index::as_path(target), p)
                .ctx(|| format!("creating symlink {}", p.display()))?;
            path_meta(p, m, m.mode, w)?;
        }
        Kind::Char | Kind::Block | Kind::Fifo => return make_node(p, m, w),
        Kind::Hardlink | Kind::Whiteout | Kind::Opaque => {
            unreachable!("the tree holds no links or whiteouts as inodes")
        }
    }
    Ok(true)
}

/// A device node or FIFO at `p`, with its metadata. Returns false when a device node is
/// skipped: only root may make them, and a pull without root goes on, with one warning.
fn make_node(p: &Path, m: &Meta, w: &Warnings) -> Result<bool> {
    let ft = match m.kind {
        Kind::Char => FileType::CharacterDevice,
        Kind::Block => FileType::BlockDevice,
        _ => FileType::Fifo,
    };
    let dev = rustix::fs::makedev(m.dev_major, m.dev_minor);
    match rustix::fs::mknodat(CWD, p, ft, Mode::from_raw_mode(m.mode), dev) {
        Ok(()) => path_meta(p, m, m.mode, w)?,
        Err(e) if e == rustix::io::Errno::PERM && m.kind != Kind::Fifo => {
            w.once("mknod", || {
                format!(
                    "device nodes need root; skipped {} and any others",
                    p.display()
                )
            });
            return Ok(false);
        }
        Err(e) => {
            return Err(std::io::Error::from(e)).ctx(|| format!("creating {}", p.display()));
        }
    }
    Ok(true)
}

/// Set the metadata of every directory in `order` (placed at `paths`) and of the root.
fn dir_metas(
    tree: &Tree,
    order: &[DentryId],
    paths: &[Option<PathBuf>],
    w: &Warnings,
) -> Result<()> {
    // Directories last, deepest first: creating children changes a directory's mtime, and a
    // read-only mode would stop us creating them.
    let dirs = order
        .iter()
        .rev()
        .copied()
        .filter(|&d| tree.inode_of(d).meta.kind == Kind::Dir)
        .chain(std::iter::once::<DentryId>(ROOT));
    for d in dirs {
        if let Some(p) = &paths[d as usize] {
            let m = &tree.inode_of(d).meta;
            let created = if d == ROOT {
                0o777
            } else {
                dir_create_mode(m.mode)
            };
            path_meta(p, m, created, w)?;
        }
    }
    Ok(())
}
