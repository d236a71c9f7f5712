//! `imgfs store` over FUSE: the directory layout containers/storage looks up in an Additional
//! Layer Store (docs/layer-store.md), over a [`Store`]:
//!
//! ```text
//! DIR/.status                       counts, and the latest refusals with their reasons
//! DIR/<base64 of a reference>/      made on lookup (any reference; nothing is resolved yet)
//!     <layer digest>/               looked up: the image resolved, the layer's index obtained
//!         diff/                     the layer's own tree in overlayfs form, read lazily
//!         info                      the containers/storage layer record (JSON)
//!         blob                      the compressed blob (fetched whole on first read)
//!         use                       never exists: creating it counts a use (ENOENT answers
//!                                   "understood"); removing the layer directory releases one
//! ```
//!
//! A lookup that needs the network or an index is answered from a task on the runtime, never
//! on the FUSE thread; a layer that cannot be served answers ENOENT, and containers/storage
//! then pulls it itself. Inode numbers: the store's own nodes count from 1; the diff tree of
//! the layer in slot `k` (1-based) is `k << 32 | (tree inode + 1)`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::{TTL, file_type, libc_flags, reply_xattr};
use crate::store::Store;

mod nodes;
use nodes::{Ino, Node, Nodes, attr_of, reference_of, split_ino, tree_ino};

const STATUS: &[u8] = b".status";
/// The status file's inode (the root is 1).
const STATUS_INO: u64 = 2;

pub struct StoreFs {
    store: Arc<Store>,
    rt: tokio::runtime::Handle,
    nodes: Arc<RwLock<Nodes>>,
    /// Shown as every store node's times.
    started: SystemTime,
}

impl StoreFs {
    pub fn new(store: Arc<Store>, rt: tokio::runtime::Handle) -> StoreFs {
        let mut nodes = Nodes::default();
        nodes.push(Node::Root);
        nodes.push(Node::Status);
        StoreFs {
            store,
            rt,
            nodes: Arc::new(RwLock::new(nodes)),
            started: SystemTime::now(),
        }
    }
}

impl StoreFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        attr_of(&self.nodes.read().unwrap(), self.started, ino)
    }

    /// Look `name` up under reference directory `parent`: resolve the layer on the runtime
    /// and answer from there.
    fn lookup_layer(&self, parent: u64, reference: String, name: Vec<u8>, reply: ReplyEntry) {
        let (store, nodes, started) = (self.store.clone(), self.nodes.clone(), self.started);
        self.rt.spawn(async move {
            let Ok(digest) = std::str::from_utf8(&name) else {
                return reply.error(Errno::ENOENT);
            };
            match store.layer(&reference, digest).await {
                Ok(layer) => {
                    let mut nodes = nodes.write().unwrap();
                    let ino = nodes.add_layer(parent, &name, layer);
                    match attr_of(&nodes, started, INodeNo(ino)) {
                        Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
                        None => reply.error(Errno::EIO),
                    }
                }
                // Said in the log and the status file; containers/storage pulls the layer.
                Err(_) => reply.error(Errno::ENOENT),
            }
        });
    }

    /// The children of directory `ino`, as (name, inode, type), `.` and `..` first.
    fn children(&self, ino: INodeNo) -> Option<Vec<(Vec<u8>, INodeNo, FileType)>> {
        let nodes = self.nodes.read().unwrap();
        let mut out = vec![
            (b".".to_vec(), ino, FileType::Directory),
            (b"..".to_vec(), ino, FileType::Directory),
        ];
        match split_ino(ino)? {
            Ino::Store(n) => match nodes.node(n)? {
                Node::Root => {
                    out.push((STATUS.to_vec(), INodeNo(STATUS_INO), FileType::RegularFile));
                    out.extend(
                        nodes
                            .refs
                            .iter()
                            .map(|(k, &v)| (k.clone(), INodeNo(v), FileType::Directory)),
                    );
                }
                Node::RefDir { layers, .. } => {
                    out.extend(
                        layers
                            .iter()
                            .map(|(k, &v)| (k.clone(), INodeNo(v), FileType::Directory)),
                    );
                }
                Node::LayerDir { slot, info, blob } => {
                    out.push((b"diff".to_vec(), tree_ino(*slot, 0), FileType::Directory));
                    out.push((b"info".to_vec(), INodeNo(*info), FileType::RegularFile));
                    out.push((b"blob".to_vec(), INodeNo(*blob), FileType::RegularFile));
                }
                _ => return None,
            },
            Ino::Tree(slot, i) => {
                let served = nodes.served(slot)?;
                let tree = &served.layer.view.tree;
                let d = *served.dir_dentry.get(&i)?;
                out.extend(tree.children(d).map(|c| {
                    let de = &tree.dentries[c as usize];
                    let kind = file_type(tree.inodes[de.inode as usize].meta.kind);
                    (de.name.to_vec(), tree_ino(slot, de.inode), kind)
                }));
            }
        }
        Some(out)
    }

    /// The layer directory `name` under reference directory `parent`, if looked up before.
    fn layer_dir(&self, parent: INodeNo, name: &OsStr) -> Option<u64> {
        let nodes = self.nodes.read().unwrap();
        match nodes.node(u64::from(parent))? {
            Node::RefDir { layers, .. } => layers.get(name.as_bytes()).copied(),
            _ => None,
        }
    }

    /// Count a use of the layer in layer directory `parent`, when `name` is `use`.
    fn note_use(&self, parent: INodeNo, name: &OsStr) -> Errno {
        let nodes = self.nodes.read().unwrap();
        match nodes.node(u64::from(parent)) {
            Some(Node::LayerDir { slot, .. }) if name.as_bytes() == b"use" => {
                if let Some(s) = nodes.served(*slot) {
                    s.layer
                        .uses
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // "Not there": what containers/storage takes as a store that counts uses.
                Errno::ENOENT
            }
            _ => Errno::EROFS,
        }
    }
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes();
        let found = {
            let mut nodes = self.nodes.write().unwrap();
            match split_ino(parent) {
                Some(Ino::Store(p)) => match nodes.node(p) {
                    Some(Node::Root) if name == STATUS => Some(STATUS_INO),
                    Some(Node::Root) => match nodes.refs.get(name) {
                        Some(&ino) => Some(ino),
                        None => match reference_of(name) {
                            Some(reference) => {
                                let ino = nodes.push(Node::RefDir {
                                    reference,
                                    layers: BTreeMap::new(),
                                });
                                nodes.refs.insert(name.to_vec(), ino);
                                Some(ino)
                            }
                            None => None,
                        },
                    },
                    Some(Node::RefDir { reference, layers }) => match layers.get(name) {
                        Some(&ino) => Some(ino),
                        None => {
                            let reference = reference.clone();
                            drop(nodes);
                            return self.lookup_layer(p, reference, name.to_vec(), reply);
                        }
                    },
                    Some(Node::LayerDir { slot, info, blob }) => match name {
                        b"diff" => Some(u64::from(tree_ino(*slot, 0))),
                        b"info" => Some(*info),
                        b"blob" => Some(*blob),
                        _ => None,
                    },
                    _ => None,
                },
                Some(Ino::Tree(slot, i)) => nodes.served(slot).and_then(|s| {
                    let tree = &s.layer.view.tree;
                    let d = *s.dir_dentry.get(&i)?;
                    let c = *tree.dentries[d as usize]
                        .children
                        .as_ref()?
                        .get(bstr::BStr::new(name))?;
                    Some(u64::from(tree_ino(slot, tree.dentries[c as usize].inode)))
                }),
                None => None,
            }
        };
        match found.and_then(|ino| self.attr(INodeNo(ino))) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            // The status file changes: its attributes are not cached.
            Some(attr) if u64::from(ino) == STATUS_INO => reply.attr(&Duration::ZERO, &attr),
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let nodes = self.nodes.read().unwrap();
        let link = match split_ino(ino) {
            Some(Ino::Tree(slot, i)) => nodes
                .served(slot)
                .and_then(|s| s.layer.view.tree.inodes.get(i as usize))
                .and_then(|inode| inode.meta.link.as_deref()),
            _ => None,
        };
        match link {
            Some(l) => reply.data(l),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & (libc_flags::O_WRONLY | libc_flags::O_RDWR) != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.attr(ino) {
            // The status file is made at each read: no page cache, sizes as read.
            Some(_) if u64::from(ino) == STATUS_INO => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
            }
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
        let slice = |data: &[u8]| {
            let from = (offset as usize).min(data.len());
            let to = from.saturating_add(size as usize).min(data.len());
            data[from..to].to_vec()
        };
        let nodes = self.nodes.read().unwrap();
        match split_ino(ino) {
            Some(Ino::Tree(slot, i)) => {
                let Some(s) = nodes.served(slot) else {
                    return reply.error(Errno::ENOENT);
                };
                let layer = s.layer.clone();
                self.rt
                    .spawn_blocking(move || match layer.view.read(i, offset, size as usize) {
                        Ok(data) => reply.data(&data),
                        Err(e) => {
                            tracing::error!(
                                "read of {} inode {i} at {offset}: {e}",
                                layer.descriptor.digest
                            );
                            reply.error(Errno::EIO);
                        }
                    });
            }
            Some(Ino::Store(n)) => match nodes.node(n) {
                Some(Node::Status) => reply.data(&slice(self.store.status().as_bytes())),
                Some(Node::Info(slot)) => match nodes.served(*slot) {
                    Some(s) => reply.data(&slice(&s.layer.info)),
                    None => reply.error(Errno::ENOENT),
                },
                Some(Node::Blob(slot)) => {
                    let Some(s) = nodes.served(*slot) else {
                        return reply.error(Errno::ENOENT);
                    };
                    let (layer, store) = (s.layer.clone(), self.store.clone());
                    self.rt.spawn(async move {
                        let read = async {
                            let path = store.blob(&layer).await?;
                            tokio::task::spawn_blocking(move || {
                                let f = std::fs::File::open(path)?;
                                let mut buf = vec![0; size as usize];
                                let n = f.read_at(&mut buf, offset)?;
                                buf.truncate(n);
                                Ok::<_, std::io::Error>(buf)
                            })
                            .await
                            .map_err(crate::error::Error::worker)?
                            .map_err(|e| crate::error::Error::Io {
                                context: format!("reading the blob of {}", layer.descriptor.digest),
                                cause: e,
                            })
                        };
                        match read.await {
                            Ok(data) => reply.data(&data),
                            Err(e) => {
                                tracing::error!("blob of {}: {e}", layer.descriptor.digest);
                                reply.error(Errno::EIO);
                            }
                        }
                    });
                }
                _ => reply.error(Errno::EISDIR),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(children) = self.children(ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (next, (name, child, kind)) in children.into_iter().enumerate().skip(offset as usize) {
            if reply.add(child, next as u64 + 1, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.note_use(parent, name));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.note_use(parent, name));
    }

    /// Removing a layer directory releases a use; the layer stays served (ENOENT: "done").
    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(dir) = self.layer_dir(parent, name) else {
            return reply.error(Errno::EROFS);
        };
        let nodes = self.nodes.read().unwrap();
        if let Some(Node::LayerDir { slot, .. }) = nodes.node(dir)
            && let Some(s) = nodes.served(*slot)
        {
            let uses = &s.layer.uses;
            let _ = uses.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| n.checked_sub(1),
            );
        }
        reply.error(Errno::ENOENT);
    }

    /// "Not a typewriter", as `ImageFs` answers.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// ENOSYS tells the kernel to take every file as always ready (they are) and not to ask
    /// again; fuser's default says the same with a warning per call.
    #[allow(clippy::too_many_arguments)]
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let nodes = self.nodes.read().unwrap();
        let value = match split_ino(ino) {
            Some(Ino::Tree(slot, i)) => nodes
                .served(slot)
                .and_then(|s| s.layer.view.tree.inodes.get(i as usize))
                .and_then(|inode| {
                    inode
                        .meta
                        .xattrs
                        .iter()
                        .find(|(k, _)| k.as_bytes() == name.as_bytes())
                }),
            _ => None,
        };
        match value {
            Some((_, v)) => reply_xattr(reply, size, v),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let nodes = self.nodes.read().unwrap();
        let mut names = Vec::new();
        if let Some(Ino::Tree(slot, i)) = split_ino(ino)
            && let Some(inode) = nodes
                .served(slot)
                .and_then(|s| s.layer.view.tree.inodes.get(i as usize))
        {
            for (k, _) in &inode.meta.xattrs {
                names.extend_from_slice(k.as_bytes());
                names.push(0);
            }
        }
        reply_xattr(reply, size, &names);
    }
}
