//! An image as a readable tree, without extracting it: the merged [`Tree`] plus, for every
//! regular file, a way to read any byte range of its layer blob. `mount` serves it over FUSE;
//! `ls` and `cat` answer from it directly.
//!
//! Reads go through seek points. Where the verified blob is in the cache, a span is
//! decompressed from it (an uncompressed layer is read in place). Where it is not — the
//! default after the first mount, since only indexes are kept — the span's compressed bytes
//! are fetched from the source by range, checked against the span digest recorded when the
//! index was built from the verified blob, kept in the cache's chunk store, and decompressed:
//! bytes that do not match are never served. A source that ignores ranges (or a span too big
//! to fetch whole) makes the layer fall back to downloading its blob once. Decompressed
//! pieces (at most 4 MiB each) sit in an LRU bounded by bytes, so sequential and repeated reads
//! decompress each once; moving sequentially into a new span fetches the next ones ahead.
//! What a local gzip blob holds in stored blocks (data deflate could not shrink) is not
//! decompressed at all: it is copied straight out of the blob.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::Result;
use crate::index::{self};
use crate::tree::{InodeId, Tree};

mod batch;
mod fetcher;
mod gates;
mod layer;
mod open;
mod pieces;
mod prefetch;
mod profile;
mod read;
mod readahead;
mod windows;

pub use crate::obtain::{IndexProgress, ProgressSink};
use fetcher::Fetcher;
use gates::Gates;
pub use layer::LayerData;
pub use open::open_layer;

/// What to fetch besides what readers ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Nothing: every byte fetched was asked for by a read.
    None,
    /// Spans ahead of sequential readers.
    #[default]
    Auto,
    /// Everything, in the background after the mount is ready.
    All,
}

/// Options for [`ImageView::open`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// Only the first N layers (the image as of its N-th layer).
    pub layers: Option<usize>,
    /// Layers fetched and indexed at once.
    pub jobs: usize,
    /// Decompressed pieces kept in memory, as a budget of this many full-size pieces
    /// (smaller ones, TOC chunks of small files, take less of it).
    pub cached_pieces: usize,
    /// Keep whole blobs in the cache when indexing (default: indexes and fetched spans only).
    pub keep_blobs: bool,
    pub prefetch: Prefetch,
    /// The most compressed spans (bytes) the cache's chunk store may hold; older ones go.
    pub chunk_cache: u64,
    /// Limits on each layer's uncompressed stream.
    pub limits: index::Limits,
    /// Look in the registry for a published index of each layer with none in the cache
    /// (`crate::artifact`) before indexing it here.
    pub remote_index: bool,
    /// Only this path (normalised) will be looked at: merge just the entries that decide it,
    /// when that is possible (`cat` of one file in a big image).
    pub only_path: Option<bstr::BString>,
    /// Told as layers are indexed here (a cold mount can take a while).
    pub progress: Option<ProgressSink>,
    /// Record which spans and chunks reads use (`Reader::recorder`), for an access profile.
    pub record_profile: bool,
    /// Fetch the access profile published with the indexes, for a mount to replay (a
    /// command that reads one file has no use for it).
    pub want_profile: bool,
}

impl ViewOptions {
    /// How the view's layers' indexes may be obtained.
    pub fn obtain(&self) -> crate::obtain::Options {
        crate::obtain::Options {
            remote_index: self.remote_index,
            keep_blobs: self.keep_blobs,
            limits: self.limits,
            progress: self.progress.clone(),
            keep_spans: Some(self.chunk_cache),
            ..crate::obtain::Options::default()
        }
    }
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            layers: None,
            jobs: 4,
            // Three: the piece a sequential reader is in, the one made ahead for it, one
            // more for a second reader or a read that crosses into the next piece. Each is
            // up to ~5 MiB of daemon RSS.
            cached_pieces: 3,
            keep_blobs: false,
            prefetch: Prefetch::Auto,
            chunk_cache: 1 << 30,
            remote_index: true,
            limits: index::Limits::default(),
            only_path: None,
            progress: None,
            record_profile: false,
            want_profile: false,
        }
    }
}

/// Counters of what reads cost, for logs, tests and the benchmark.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Ranges fetched from the source, and their bytes.
    pub ranges: AtomicU64,
    pub range_bytes: AtomicU64,
    /// Spans found in the chunk store.
    pub chunk_hits: AtomicU64,
    /// Whole blobs downloaded because ranges could not be used.
    pub blob_fallbacks: AtomicU64,
}

/// A decompressed piece: (layer, uncompressed offset where it starts).
type PieceKey = (u32, u64);

/// An image's merged tree and its layers, read through a [`Reader`].
pub struct ImageView {
    pub tree: Tree,
    pub layers: Vec<Arc<LayerData>>,
    pub reader: Arc<Reader>,
}

/// One layer alone, servable without the merged image: its own tree (the layer applied to
/// nothing) and its bytes, through the same [`Reader`] as the views that share it.
pub struct LayerView {
    pub tree: Tree,
    pub layer: Arc<LayerData>,
    pub reader: Arc<Reader>,
}

impl LayerView {
    /// The tree of `layer` alone. Fails (naming the entry) where the layer needs a lower
    /// one, as a hard link to a file below it does.
    pub fn new(layer: Arc<LayerData>, reader: Arc<Reader>) -> Result<LayerView> {
        let tree = crate::tree::merge(&[&layer.index], std::slice::from_ref(&layer.digest))?;
        Ok(LayerView {
            tree,
            layer,
            reader,
        })
    }

    /// The tree of `layer` alone in overlayfs form (`tree::overlay_form`): whiteouts as 0/0
    /// character devices, opaque directories marked by xattrs, for a runtime's overlay mount.
    pub fn overlay(layer: Arc<LayerData>, reader: Arc<Reader>) -> Result<LayerView> {
        let form = crate::tree::overlay_form(&layer.index);
        let tree = crate::tree::merge(&[&form], std::slice::from_ref(&layer.digest))?;
        Ok(LayerView {
            tree,
            layer,
            reader,
        })
    }

    /// Read up to `len` bytes at `offset` of regular file `inode` of this layer's tree.
    pub fn read(&self, inode: InodeId, offset: u64, len: usize) -> Result<Bytes> {
        let Some(data) = self.tree.inodes[inode as usize].data else {
            return Err(crate::error::Error::malformed("read", "not a regular file"));
        };
        self.reader
            .read_file(&self.layer, data.entry as usize, offset, len, false)
    }
}

/// What views share: the cache and fetching by range, decompressed pieces, background
/// work, and the layers open in the process — so that one process can hold many images: a
/// layer two of them share has its index loaded once and its pieces cached once. A view
/// opened on its own makes its own.
pub struct Reader {
    fetcher: Arc<Fetcher>,
    prefetch: Prefetch,
    keep_blobs: bool,
    pieces: Mutex<pieces::PieceCache>,
    /// One gate per piece being decompressed: readahead sends several reads into one cold
    /// span at once, and only the first should decompress it (CPU, and memory).
    making: Gates<PieceKey>,
    /// Cancelled when the reader goes: background prefetch stops at its next span or chunk
    /// rather than fetching for views nobody reads.
    background: tokio_util::sync::CancellationToken,
    /// Layers open through this reader, by digest: each one's index is loaded once.
    open_layers: Mutex<HashMap<Digest, std::sync::Weak<LayerData>>>,
    /// Where reads are recorded, when an access profile is being made.
    recorder: Option<Arc<crate::profile::Recorder>>,
}

impl Reader {
    /// A reader over `cache`, with `opts`' bounds (chunk store, pieces) and prefetch policy.
    /// Needs a tokio runtime: range requests run on it.
    pub fn new(cache: &Cache, opts: &ViewOptions) -> Arc<Reader> {
        Arc::new(Reader {
            fetcher: Arc::new(Fetcher {
                cache: cache.clone(),
                rt: tokio::runtime::Handle::current(),
                gates: Gates::new(),
                chunk_gates: Gates::new(),
                chunk_bytes: Mutex::new(None),
                chunk_max: opts.chunk_cache,
                stats: ReadStats::default(),
            }),
            prefetch: opts.prefetch,
            keep_blobs: opts.keep_blobs,
            pieces: Mutex::new(pieces::PieceCache::new(
                opts.cached_pieces.max(1) * crate::bufpool::CAP,
            )),
            making: Gates::new(),
            background: tokio_util::sync::CancellationToken::new(),
            open_layers: Mutex::new(HashMap::new()),
            recorder: opts
                .record_profile
                .then(|| Arc::new(crate::profile::Recorder::new())),
        })
    }

    /// The recording of what reads used, when the options asked for one.
    pub fn recorder(&self) -> Option<Arc<crate::profile::Recorder>> {
        self.recorder.clone()
    }

    /// Measure the chunk store again at its next store: something else (a layer streamed
    /// to index it) added to it.
    pub(super) fn recount_chunks(&self) {
        *self.fetcher.chunk_bytes.lock().unwrap() = None;
    }

    /// What reads have fetched so far.
    pub fn stats(&self) -> &ReadStats {
        &self.fetcher.stats
    }

    /// The layer with this digest, if a view opened through this reader still holds it.
    pub(super) fn open_layer(&self, digest: &Digest) -> Option<Arc<LayerData>> {
        self.open_layers
            .lock()
            .unwrap()
            .get(digest)
            .and_then(std::sync::Weak::upgrade)
    }

    pub(super) fn remember_layer(&self, layer: &Arc<LayerData>) {
        let mut open = self.open_layers.lock().unwrap();
        open.retain(|_, l| l.strong_count() > 0);
        open.insert(layer.descriptor.digest.clone(), Arc::downgrade(layer));
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

impl ImageView {
    /// What reads have fetched so far.
    pub fn stats(&self) -> &ReadStats {
        self.reader.stats()
    }

    /// How many layers are read by range (their blob is not local).
    pub fn remote_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.local.get().is_none())
            .count()
    }
}
