//! The layer store's inode table: its own nodes (root, status file, reference and layer
//! directories, `info` and `blob` files) and the layers being served, each in a slot whose
//! diff tree takes the inode numbers `slot << 32 | (tree inode + 1)`; and their attributes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

use super::super::tree_attr;
use crate::digest::Digest;
use crate::index::Kind;
use crate::store::StoreLayer;
use crate::tree::{DentryId, InodeId, ROOT};

const SLOT_SHIFT: u32 = 32;

/// The store's own nodes, and the layers being served.
#[derive(Default)]
pub(super) struct Nodes {
    /// Inode `i + 1` is `list[i]`; the root is first.
    pub(super) list: Vec<Node>,
    /// The root's children: reference directories by name.
    pub(super) refs: HashMap<Vec<u8>, u64>,
    /// Layer `k` (1-based) is `slots[k - 1]`; a layer under several references has one.
    pub(super) slots: Vec<Served>,
    pub(super) slot_of: HashMap<Digest, u64>,
}

pub(super) enum Node {
    Root,
    Status,
    RefDir {
        reference: String,
        layers: BTreeMap<Vec<u8>, u64>,
    },
    LayerDir {
        slot: u64,
        info: u64,
        blob: u64,
    },
    Info(u64),
    Blob(u64),
}

/// A layer being served, with each directory inode's entry (as `ImageFs` keeps them).
pub(super) struct Served {
    pub(super) layer: Arc<StoreLayer>,
    pub(super) dir_dentry: HashMap<InodeId, DentryId>,
}

/// What an inode number names.
pub(super) enum Ino {
    Store(u64),
    Tree(u64, InodeId),
}

pub(super) fn split_ino(ino: INodeNo) -> Option<Ino> {
    let n = u64::from(ino);
    match n >> SLOT_SHIFT {
        0 => Some(Ino::Store(n)),
        slot => Some(Ino::Tree(
            slot,
            (n & 0xffff_ffff).checked_sub(1)? as InodeId,
        )),
    }
}

pub(super) fn tree_ino(slot: u64, i: InodeId) -> INodeNo {
    INodeNo((slot << SLOT_SHIFT) | (i as u64 + 1))
}

/// The reference a root entry's name encodes: standard base64 with padding, as
/// containers/storage writes it, of a reference as it prints one (`host/repo:tag`); or the
/// URL-safe alphabet, which never puts a `/` in a name (the snapshotter's layer paths). The
/// two alphabets differ only in characters the other lacks, so a name decodes one way.
pub(super) fn reference_of(name: &[u8]) -> Option<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let raw = STANDARD
        .decode(name)
        .or_else(|_| URL_SAFE.decode(name))
        .ok()?;
    let reference = String::from_utf8(raw).ok()?;
    (!reference.is_empty() && !reference.contains(char::is_whitespace)).then_some(reference)
}

impl Nodes {
    pub(super) fn node(&self, ino: u64) -> Option<&Node> {
        self.list.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    pub(super) fn push(&mut self, node: Node) -> u64 {
        self.list.push(node);
        self.list.len() as u64
    }

    pub(super) fn served(&self, slot: u64) -> Option<&Served> {
        self.slots.get(usize::try_from(slot).ok()?.checked_sub(1)?)
    }

    /// The layer directory for `layer` under reference directory `parent`, made if new.
    pub(super) fn add_layer(&mut self, parent: u64, name: &[u8], layer: Arc<StoreLayer>) -> u64 {
        if let Some(Node::RefDir { layers, .. }) = self.node(parent)
            && let Some(&ino) = layers.get(name)
        {
            return ino;
        }
        let digest = layer.descriptor.digest.clone();
        let slot = match self.slot_of.get(&digest) {
            Some(&slot) => slot,
            None => {
                let tree = &layer.view.tree;
                let dir_dentry = tree
                    .walk()
                    .into_iter()
                    .chain([ROOT])
                    .map(|d| (tree.dentries[d as usize].inode, d))
                    .filter(|(i, _)| tree.inodes[*i as usize].meta.kind == Kind::Dir)
                    .collect();
                self.slots.push(Served { layer, dir_dentry });
                let slot = self.slots.len() as u64;
                self.slot_of.insert(digest, slot);
                slot
            }
        };
        let info = self.push(Node::Info(slot));
        let blob = self.push(Node::Blob(slot));
        let ino = self.push(Node::LayerDir { slot, info, blob });
        if let Some(Node::RefDir { layers, .. }) = self.list.get_mut(parent as usize - 1) {
            layers.insert(name.to_vec(), ino);
        }
        ino
    }
}

/// The attributes of inode `ino`; the store's own nodes show `started` as their times.
pub(super) fn attr_of(nodes: &Nodes, started: SystemTime, ino: INodeNo) -> Option<FileAttr> {
    match split_ino(ino)? {
        Ino::Store(n) => store_attr(nodes, started, n),
        Ino::Tree(slot, i) => {
            let tree = &nodes.served(slot)?.layer.view.tree;
            ((i as usize) < tree.inodes.len()).then(|| tree_attr(tree, i, tree_ino(slot, i)))
        }
    }
}

pub(super) fn store_attr(nodes: &Nodes, started: SystemTime, ino: u64) -> Option<FileAttr> {
    let (kind, size) = match nodes.node(ino)? {
        Node::Root | Node::RefDir { .. } | Node::LayerDir { .. } => (FileType::Directory, 0),
        Node::Status => (FileType::RegularFile, 0),
        Node::Info(slot) => (
            FileType::RegularFile,
            nodes.served(*slot)?.layer.info.len() as u64,
        ),
        Node::Blob(slot) => (
            FileType::RegularFile,
            nodes.served(*slot)?.layer.descriptor.size,
        ),
    };
    let dir = kind == FileType::Directory;
    Some(FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: started,
        mtime: started,
        ctime: started,
        crtime: started,
        kind,
        perm: if dir { 0o755 } else { 0o444 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    })
}
