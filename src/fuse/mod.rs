//! The image served read-only over FUSE (fuser): the [`ImageView`]'s tree as inodes, file data
//! read through its seek points.
//!
//! The image never changes, so the kernel is told to cache everything for long (entries,
//! attributes, directory listings, page cache kept across opens, symlinks) and to read ahead
//! generously. Metadata requests are answered inline from memory; reads, which may decompress
//! a span, are handed to a blocking thread pool and answered from there (fuser's replies are
//! `Send`), so one slow read never stalls `ls`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request,
};

mod colocate;
pub mod store;

use crate::index::Kind;
use crate::tree::{DentryId, InodeId, ROOT};
use crate::view::ImageView;

/// How long the kernel may trust what we said: the image is immutable.
const TTL: Duration = Duration::from_secs(24 * 3600);

pub struct ImageFs {
    view: Arc<ImageView>,
    /// The directory entry of each directory inode (directories have exactly one).
    dir_dentry: Vec<DentryId>,
    /// Each directory's entries in listing order, by directory inode: made once, so that a
    /// `readdir` continuing at offset k costs only the entries it returns.
    children: Vec<Box<[DentryId]>>,
    rt: tokio::runtime::Handle,
    /// The kernel takes ENOSYS from OPENDIR as "never ask again" (see `opendir`).
    no_opendir: bool,
    /// Whether that may be used: not with `allow_root`, whose limit fuser enforces on
    /// OPENDIR (not on READDIR), so skipping OPENDIR would let any user list directories.
    pub may_skip_opendir: bool,
}

/// FUSE inode numbers are tree inode ids plus one (FUSE's root is 1, the tree's 0).
fn fuse_ino(i: InodeId) -> INodeNo {
    INodeNo(i as u64 + 1)
}

impl ImageFs {
    pub fn new(view: ImageView, rt: tokio::runtime::Handle) -> ImageFs {
        let tree = &view.tree;
        let mut dir_dentry = vec![DentryId::MAX; tree.inodes.len()];
        dir_dentry[0] = ROOT;
        for d in tree.walk() {
            let de = &tree.dentries[d as usize];
            if tree.inodes[de.inode as usize].meta.kind == Kind::Dir {
                dir_dentry[de.inode as usize] = d;
            }
        }
        let children = dir_dentry
            .iter()
            .map(|&d| {
                if d == DentryId::MAX {
                    Box::default()
                } else {
                    tree.children(d).collect()
                }
            })
            .collect();
        ImageFs {
            view: Arc::new(view),
            dir_dentry,
            children,
            rt,
            no_opendir: false,
            may_skip_opendir: true,
        }
    }

    fn inode(&self, ino: INodeNo) -> Option<InodeId> {
        let i = u64::from(ino).checked_sub(1)?;
        (i < self.view.tree.inodes.len() as u64).then_some(i as InodeId)
    }

    fn attr(&self, i: InodeId) -> FileAttr {
        tree_attr(&self.view.tree, i, fuse_ino(i))
    }
}

/// The attributes of tree inode `i`, as FUSE inode `ino`.
fn tree_attr(tree: &crate::tree::Tree, i: InodeId, ino: INodeNo) -> FileAttr {
    let inode = &tree.inodes[i as usize];
    let m = &inode.meta;
    let kind = file_type(m.kind);
    let size = match m.kind {
        Kind::File | Kind::Symlink => m.size,
        _ => 0,
    };
    let time = if m.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(m.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(m.mtime.unsigned_abs())
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: (m.mode & 0o7777) as u16,
        nlink: inode.nlink.max(1),
        uid: m.uid,
        gid: m.gid,
        rdev: rustix::fs::makedev(m.dev_major, m.dev_minor) as u32,
        flags: 0,
        blksize: 4096,
    }
}

impl ImageFs {
    fn dir(&self, ino: INodeNo) -> Option<DentryId> {
        let i = self.inode(ino)?;
        let d = self.dir_dentry[i as usize];
        (d != DentryId::MAX).then_some(d)
    }

    /// A directory's entries from listing position `offset` on, as (position of the next
    /// entry, name, inode): `.`, `..`, then children by name.
    fn entries(&self, d: DentryId, offset: u64) -> impl Iterator<Item = (u64, &[u8], InodeId)> {
        let tree = &self.view.tree;
        let de = &tree.dentries[d as usize];
        let parent = tree.dentries[de.parent as usize].inode;
        let dots = [(&b"."[..], de.inode), (&b".."[..], parent)];
        let children = self.children[de.inode as usize].iter().map(|&c| {
            let cd = &tree.dentries[c as usize];
            (cd.name.as_slice(), cd.inode)
        });
        dots.into_iter()
            .chain(children.skip((offset as usize).saturating_sub(2)))
            .skip((offset as usize).min(2))
            .zip(offset + 1..)
            .map(|((name, ino), next)| (next, name, ino))
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

/// Reply with an xattr value or name list, honouring the size protocol.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Each is a request; a kernel that refuses one still works without it.
        let _ = config.set_max_readahead(1 << 20);
        // READDIRPLUS always, not FUSE_READDIRPLUS_AUTO: with AUTO the kernel asks for
        // attributes only at a listing's start, so a directory whose listing takes more
        // than one request gets its later entries bare, and a walk then sends a LOOKUP for
        // each subdirectory among them (each entry, if it stats them). Attributes cost us
        // nothing to give: they are in memory. (BENCHMARKS.md, "First walk and memory".)
        let _ = config.add_capabilities(
            InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        self.no_opendir = self.may_skip_opendir
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
                .is_ok();
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        colocate::note(req.pid());
        let Some(d) = self.dir(parent) else {
            return reply.error(Errno::ENOTDIR);
        };
        let tree = &self.view.tree;
        let found = tree.dentries[d as usize]
            .children
            .as_ref()
            .and_then(|c| c.get(bstr::BStr::new(name.as_bytes())).copied());
        match found {
            Some(c) => {
                let attr = self.attr(tree.dentries[c as usize].inode);
                reply.entry(&TTL, &attr, Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        colocate::note(req.pid());
        match self.inode(ino) {
            Some(i) => reply.attr(&TTL, &self.attr(i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        colocate::note(req.pid());
        match self
            .inode(ino)
            .and_then(|i| self.view.tree.inodes[i as usize].meta.link.as_deref())
        {
            Some(l) => reply.data(l),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        colocate::note(req.pid());
        if flags.0 & (libc_flags::O_WRONLY | libc_flags::O_RDWR) != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.inode(ino) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(i) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let view = self.view.clone();
        self.rt
            .spawn_blocking(move || match view.read(i, offset, size as usize) {
                Ok(data) => {
                    let n = data.len();
                    reply.data(&data);
                    // Not kept while decompressing ahead: it holds its whole piece.
                    drop(data);
                    view.decompress_ahead(i, offset, n);
                }
                Err(e) => {
                    tracing::error!("read of inode {i} at {offset}: {e}");
                    reply.error(Errno::EIO);
                }
            });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written: closing a file has nothing to flush.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Where the kernel allows it, the first OPENDIR answers ENOSYS: from then on the
        // kernel opens and releases directories without asking, and caches listings as if
        // every open said FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR. That is two requests fewer per
        // directory (OPENDIR, RELEASEDIR), and each costs a cross-CPU wakeup both ways: a
        // first `find` of the bench image went from ~0.21 to ~0.14 s; later walks are still
        // answered by the kernel alone.
        match self.dir(ino) {
            Some(_) if self.no_opendir => reply.error(Errno::ENOSYS),
            Some(_) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        colocate::note(req.pid());
        let Some(d) = self.dir(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        // The offset handed out with an entry is where the *next* call resumes.
        for (next, name, i) in self.entries(d, offset) {
            let kind = file_type(self.view.tree.inodes[i as usize].meta.kind);
            if reply.add(fuse_ino(i), next, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        colocate::note(req.pid());
        let Some(d) = self.dir(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (next, name, i) in self.entries(d, offset) {
            let attr = self.attr(i);
            if reply.add(
                fuse_ino(i),
                next,
                OsStr::from_bytes(name),
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let tree = &self.view.tree;
        let bytes: u64 = tree.inodes.iter().map(|i| i.meta.size).sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            tree.inodes.len() as u64,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        colocate::note(req.pid());
        let Some(i) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let m = &self.view.tree.inodes[i as usize].meta;
        match m
            .xattrs
            .iter()
            .find(|(k, _)| k.as_bytes() == name.as_bytes())
        {
            Some((_, v)) => reply_xattr(reply, size, v),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        colocate::note(req.pid());
        let Some(i) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in &self.view.tree.inodes[i as usize].meta.xattrs {
            names.extend_from_slice(k.as_bytes());
            names.push(0);
        }
        reply_xattr(reply, size, &names);
    }

    /// No ioctl applies to an image's files: "not a typewriter", as a plain file answers
    /// (tar, cp and editors probe with them; fuser's default logs a warning for each).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        colocate::note(req.pid());
        if self.inode(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        // Only mounts without `default_permissions` (the owner's own) get here: they show
        // the image as its root would see it, so reading is allowed, and executing as for
        // root: a directory, or a file with an execute bit.
        let i = self.inode(ino).expect("checked above");
        let m = &self.view.tree.inodes[i as usize].meta;
        if mask.contains(AccessFlags::X_OK) && m.kind != Kind::Dir && m.mode & 0o111 == 0 {
            return reply.error(Errno::EACCES);
        }
        reply.ok();
    }
}

/// open(2) access-mode bits, as the kernel passes them.
mod libc_flags {
    pub const O_WRONLY: i32 = 1;
    pub const O_RDWR: i32 = 2;
}
