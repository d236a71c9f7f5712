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
//! pieces (at most 4 MiB each) sit in a bounded LRU, so sequential and repeated reads
//! decompress each once; moving sequentially into a new span fetches the next ones ahead.
//! What a local gzip blob holds in stored blocks (data deflate could not shrink) is not
//! decompressed at all: it is copied straight out of the blob.

use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures_util::{StreamExt, TryFutureExt, TryStreamExt};

use crate::bufpool;
use crate::cache::Cache;
use crate::digest::{Digest, SpanDigest};
use crate::error::{Error, IoContext, Result};
use crate::index::{self, LayerIndex};
use crate::layer::estargz::{self, Chunk};
use crate::layer::seek::{self, SeekPoints, SpanBytes, Stored};
use crate::manifest::{Compression, Descriptor, Image};
use crate::source::Source;
use crate::tree::{self, InodeId, Tree};

/// How far ahead of a sequential reader spans are fetched, like the kernel's readahead: a
/// window that starts at `READAHEAD_MIN` spans and doubles while the reader goes on, up to
/// `READAHEAD_MAX`, never past the end of the file being read. When fewer than half of the
/// window's spans are stored or on their way, the missing ones go in one range request.
/// Big requests matter to the registry: each costs it a few milliseconds of CPU however
/// small (distribution 2.8 over loopback, 256 MiB in ranges of 4 MiB: 0.39 CPU-s; of
/// 8 MiB: 0.24; of 32 MiB: 0.15; one download: 0.11). A batch is verified span by span as
/// it streams in, so a reader waits for its own span only, and a batch holds a few spans in
/// memory at most (the one arriving and two on their way to the store).
const READAHEAD_MIN: usize = 2;
const READAHEAD_MAX: usize = 16;

/// A span bigger than this (a single-frame zstd layer has one span) is not fetched by
/// range: the layer's blob is downloaded instead.
const MAX_RANGE: u64 = 64 << 20;
/// Attempts at one range (a cut connection, or bytes that did not match their digest).
const RANGE_ATTEMPTS: u32 = 3;

/// What to fetch besides what readers ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefetch {
    /// Nothing: every byte fetched was asked for by a read.
    None,
    /// Spans ahead of sequential readers.
    #[default]
    Auto,
    /// Everything, in the background after the mount is ready.
    All,
}

/// One layer: its descriptor and index, and where its bytes come from.
pub struct LayerData {
    pub digest: String,
    pub descriptor: Descriptor,
    pub compression: Compression,
    pub index: LayerIndex,
    /// The verified blob from the cache, open for the life of the view (so that pruning the
    /// cache never breaks a reader) — when there is one. Without it, reads go by range.
    local: OnceLock<File>,
    /// The span the last read used, to notice sequential readers.
    last_span: AtomicUsize,
    /// The sequential reader's readahead window, in spans (see [`READAHEAD_MIN`]).
    window: AtomicUsize,
    /// Where the last read of this layer through the mount ended (uncompressed), to notice
    /// sequential readers.
    last_end: AtomicU64,
    /// Where the layer's last file data ends (uncompressed): the last span's pieces go no
    /// further.
    data_end: u64,
    /// The source would not serve a range of this blob: reads need the whole blob.
    no_ranges: AtomicBool,
    /// For an eStargz layer read through its TOC: each file's chunks.
    stargz: Option<Stargz>,
    /// For a gzip layer read from its local blob: the run of stored blocks from each span's
    /// checkpoint (None: the span starts compressed), walked on first use.
    stored: Mutex<lru::LruCache<usize, Option<Arc<Stored>>>>,
}

/// Spans per layer whose stored-block walk is remembered: 256 MiB of stored data in spans of
/// 4 MiB. A walk holds 4 bytes per block: about 1 KiB for zlib's usual 16 KiB blocks, at most
/// 64 KiB for a stream of tiny blocks (the walk's cap), so at most 4 MiB per layer.
const STORED_SPANS: NonZeroUsize = NonZeroUsize::new(64).unwrap();

/// The chunk table of an eStargz layer (its entries are in `LayerData::index`).
struct Stargz {
    chunks: Vec<Vec<Chunk>>,
    prefetch: Vec<usize>,
}

impl LayerData {
    fn new(layer: &crate::manifest::Layer, index: LayerIndex, stargz: Option<Stargz>) -> Arc<Self> {
        let data_end = index
            .entries
            .iter()
            .map(|e| e.offset + e.stored_len())
            .max()
            .unwrap_or(0);
        Arc::new(LayerData {
            data_end,
            digest: layer.descriptor.digest.to_string(),
            descriptor: layer.descriptor.clone(),
            compression: layer.compression,
            index,
            local: OnceLock::new(),
            last_span: AtomicUsize::new(usize::MAX - 1),
            window: AtomicUsize::new(READAHEAD_MIN),
            last_end: AtomicU64::new(u64::MAX),
            no_ranges: AtomicBool::new(false),
            stargz,
            stored: Mutex::new(lru::LruCache::new(STORED_SPANS)),
        })
    }

    /// The stored run from span `k`'s checkpoint in the local blob `f`.
    fn stored(&self, f: &File, sp: &SeekPoints, k: usize) -> std::io::Result<Option<Arc<Stored>>> {
        if let Some(s) = self.stored.lock().unwrap().get(&k) {
            return Ok(s.clone());
        }
        let end = sp
            .checkpoints
            .get(k + 1)
            .map_or(self.data_end, |c| c.out_offset);
        let s = Stored::walk(f, &sp.checkpoints[k], end)?.map(Arc::new);
        self.stored.lock().unwrap().put(k, s.clone());
        Ok(s)
    }

    /// Uncompressed `[start, start + len)` copied straight out of the local gzip blob `f`,
    /// when stored blocks hold all of it (see [`Stored`]); None otherwise.
    fn read_stored(&self, f: &File, start: u64, len: usize) -> std::io::Result<Option<Vec<u8>>> {
        let sp = self.seek()?;
        let end = start + len as u64;
        let mut parts = Vec::new();
        let mut pos = start;
        while pos < end {
            let Some(k) = sp.span_at(pos) else {
                return Ok(None);
            };
            let Some(run) = self.stored(f, sp, k)? else {
                return Ok(None);
            };
            if !run.covers(pos, 1) {
                return Ok(None);
            }
            let take = run.out_end().min(end) - pos;
            parts.push((run, pos, take as usize));
            pos += take;
        }
        let mut out = Vec::with_capacity(len);
        for (run, at, take) in parts {
            run.copy_out(f, at, take, &mut out)?;
        }
        Ok(Some(out))
    }

    /// Decompress `len` bytes at uncompressed offset `start` from the local blob `f`.
    /// (Through a read-only mapping instead of `pread`, the copy out of the page cache moved
    /// into decompression and the daemon's RSS grew by the whole blob: not kept.)
    fn decompress_local(&self, f: &File, start: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let r = PreadFile { file: f, pos: 0 };
        let mut r = std::io::BufReader::with_capacity(256 << 10, r);
        decompress_at(&mut r, self.compression, self.seek()?, start, len)
    }

    fn seek(&self) -> std::io::Result<&SeekPoints> {
        self.index
            .seek
            .as_ref()
            .ok_or_else(|| std::io::Error::other("layer indexed without seek points"))
    }
}

/// How long looking for published layer indexes may take before layers are indexed here.
const REMOTE_INDEX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Options for [`ImageView::open`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// Only the first N layers (the image as of its N-th layer).
    pub layers: Option<usize>,
    /// Layers fetched and indexed at once.
    pub jobs: usize,
    /// Decompressed spans kept in memory.
    pub cached_spans: usize,
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
}

/// What a view tells its [`ProgressSink`] while it opens.
#[derive(Clone, Debug)]
pub enum IndexProgress {
    /// Layer `layer` (1-based, of `of`) is being indexed here: streamed once, `bytes` long.
    Indexing {
        layer: usize,
        of: usize,
        digest: Digest,
        bytes: u64,
    },
    /// It is indexed: `entries` tar entries, in `elapsed`.
    Indexed {
        layer: usize,
        of: usize,
        entries: usize,
        elapsed: std::time::Duration,
    },
}

/// Where progress goes: the caller (the cli) decides how to show it.
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn Fn(&IndexProgress) + Send + Sync>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            layers: None,
            jobs: 4,
            // Three: the piece a sequential reader is in, the one made ahead for it, one
            // more for a second reader or a read that crosses into the next piece. Each is
            // ~4.5 MiB of daemon RSS.
            cached_spans: 3,
            keep_blobs: false,
            prefetch: Prefetch::Auto,
            chunk_cache: 1 << 30,
            remote_index: true,
            limits: index::Limits::default(),
            only_path: None,
            progress: None,
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

/// Single-flight gates: the first thread to want `K` holds its gate while it does the work;
/// others wait at the gate and then find the result where the first one left it.
struct Gates<K>(Mutex<HashMap<K, Arc<Mutex<()>>>>);

impl<K: std::hash::Hash + Eq> Gates<K> {
    fn new() -> Self {
        Gates(Mutex::new(HashMap::new()))
    }

    fn gate(&self, key: K) -> Arc<Mutex<()>> {
        self.0.lock().unwrap().entry(key).or_default().clone()
    }

    /// The work for `key` is done (or failed): the next comer starts afresh.
    fn done(&self, key: &K) {
        self.0.lock().unwrap().remove(key);
    }

    /// Is someone at work on `key`?
    fn busy(&self, key: &K) -> bool {
        self.0.lock().unwrap().contains_key(key)
    }
}

/// Removes its key from the gates when dropped.
struct Done<'a, K: std::hash::Hash + Eq>(&'a Gates<K>, K);

impl<K: std::hash::Hash + Eq> Drop for Done<'_, K> {
    fn drop(&mut self) {
        self.0.done(&self.1);
    }
}

/// What reads share with background fetches: the source, the cache and the single-flight
/// gates that keep one span from being fetched twice at once.
struct Fetcher {
    src: Arc<Source>,
    cache: Cache,
    rt: tokio::runtime::Handle,
    gates: Gates<(usize, usize)>,
    /// Bytes in the chunk store (measured at the first store, then counted) and its bound.
    chunk_bytes: Mutex<Option<u64>>,
    chunk_max: u64,
    stats: ReadStats,
}

type SpanKey = (u32, u64);

pub struct ImageView {
    pub tree: Tree,
    pub layers: Vec<Arc<LayerData>>,
    fetcher: Arc<Fetcher>,
    prefetch: Prefetch,
    keep_blobs: bool,
    spans: Mutex<lru::LruCache<SpanKey, Bytes>>,
    /// One gate per span being decompressed: readahead sends several reads into one cold
    /// span at once, and only the first should decompress it (CPU, and memory).
    inflight: Gates<SpanKey>,
}

/// Index a layer blob read from `blob`: entries, and seek points with span digests.
fn build_index(
    blob: impl std::io::Read + Send + 'static,
    compression: Compression,
    limits: index::Limits,
) -> Result<LayerIndex> {
    let buffered = std::io::BufReader::with_capacity(
        256 << 10,
        crate::layer::NotEmpty::new(blob, compression),
    );
    match compression {
        Compression::Gzip => indexed(
            seek::IndexingReader::new(buffered).ctx(|| "starting to decompress".into())?,
            seek::IndexingReader::seek_points,
            limits,
        ),
        Compression::Zstd => indexed(
            crate::layer::zstd_seek::ZstdIndexingReader::new(buffered),
            crate::layer::zstd_seek::ZstdIndexingReader::seek_points,
            limits,
        ),
        Compression::None => indexed(
            seek::PlainIndexingReader::new(buffered),
            seek::PlainIndexingReader::seek_points,
            limits,
        ),
    }
}

/// Index the tar an indexing reader produces, then take its seek points.
fn indexed<R: std::io::Read>(
    mut r: R,
    seek_points: impl FnOnce(R) -> SeekPoints,
    limits: index::Limits,
) -> Result<LayerIndex> {
    let mut idx = index::build(&mut r, limits, |_, _, _| Ok(()))?;
    idx.seek = Some(seek_points(r));
    Ok(idx)
}

/// A `Read + Seek` over a shared open file by `pread`, so threads never share a file offset.
struct PreadFile<'a> {
    file: &'a File,
    pos: u64,
}

impl std::io::Read for PreadFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for PreadFile<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let std::io::SeekFrom::Start(at) = to else {
            return Err(std::io::Error::other(
                "pread files seek only from the start",
            ));
        };
        self.pos = at;
        Ok(at)
    }
}

/// Decompress `len` bytes from uncompressed offset `start` out of `blob` (the whole blob, or
/// the span of it holding `start`).
fn decompress_at(
    blob: &mut (impl std::io::BufRead + std::io::Seek),
    compression: Compression,
    sp: &SeekPoints,
    start: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let out = bufpool::take(len);
    match compression {
        Compression::Zstd => {
            crate::layer::zstd_seek::read_at(blob, &sp.checkpoints, start, len, out)
        }
        Compression::Gzip => seek::read_at(blob, &sp.checkpoints, start, len, out),
        Compression::None => {
            use std::io::Read;
            blob.seek(std::io::SeekFrom::Start(start))?;
            let mut out = out;
            blob.take(len as u64).read_to_end(&mut out)?;
            Ok(out)
        }
    }
}

/// Why a span could not be fetched by range.
enum SpanError {
    /// Only the whole blob will do (ranges ignored, or the span is too big).
    NeedBlob,
    Failed(std::io::Error),
}

impl Fetcher {
    /// Bytes `[a, b)` of a blob from the source. The request runs as a task on the runtime's
    /// workers, where socket readiness is cheap; waiting on it from this (blocking) thread
    /// costs one wake-up instead of one per body chunk — measured 3x faster.
    fn read_range(&self, desc: &Descriptor, a: u64, b: u64) -> Result<Option<Bytes>> {
        let (src, desc) = (self.src.clone(), desc.clone());
        let task = self
            .rt
            .spawn(async move { src.read_range(&desc, a, b).await });
        self.rt.block_on(task).unwrap_or_else(|e| {
            Err(Error::Io {
                context: "a range request task failed".into(),
                cause: std::io::Error::other(e.to_string()),
            })
        })
    }

    /// The compressed bytes of span `k` of `layer`: from the chunk store, or fetched by
    /// range and verified against the span digest.
    fn span(
        &self,
        li: usize,
        layer: &LayerData,
        k: usize,
    ) -> std::result::Result<Bytes, SpanError> {
        let sp = layer.seek().map_err(SpanError::Failed)?;
        let digest = sp.span_digests.get(k).ok_or_else(|| {
            SpanError::Failed(std::io::Error::other("index has no digest for this span"))
        })?;
        if let Some(b) = self.cache.load_chunk(digest) {
            self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        if layer.no_ranges.load(Ordering::Relaxed) || layer.descriptor.size_unknown {
            return Err(SpanError::NeedBlob);
        }
        let (a, b) = sp.span_range(k, layer.descriptor.size);
        if b <= a {
            return Err(SpanError::Failed(std::io::Error::other(format!(
                "span {k} of layer {} lies outside its blob ({a}-{b})",
                layer.digest
            ))));
        }
        if b - a > MAX_RANGE {
            return Err(SpanError::NeedBlob);
        }
        let gate = self.gates.gate((li, k));
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropped before `_turn`: however this ends, the gate goes with the turn.
        let _done = Done(&self.gates, (li, k));
        if let Some(b) = self.cache.load_chunk(digest) {
            self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        let what = || format!("span {k} (bytes {a}-{b}) of layer {}", layer.digest);
        let mut last = None;
        for attempt in 1..=RANGE_ATTEMPTS {
            let t = std::time::Instant::now();
            match self.read_range(&layer.descriptor, a, b) {
                Ok(Some(bytes)) => {
                    self.stats.ranges.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .range_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    let actual = SpanDigest::of(&bytes);
                    if actual == *digest {
                        tracing::debug!("fetched {} in {:.1?}", what(), t.elapsed());
                        self.keep_chunk(digest, &bytes);
                        return Ok(bytes);
                    }
                    tracing::warn!(
                        "{} from {}: digest mismatch (expected {digest}, got {actual}); \
                         not serving it (attempt {attempt} of {RANGE_ATTEMPTS})",
                        what(),
                        self.src.name()
                    );
                    self.src.distrust_mirrors();
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{}: the source sent bytes that do not match the index",
                            what()
                        ),
                    ));
                }
                Ok(None) => {
                    tracing::info!(
                        "{} ignores ranges for {}; downloading the whole blob",
                        self.src.name(),
                        layer.digest
                    );
                    layer.no_ranges.store(true, Ordering::Relaxed);
                    return Err(SpanError::NeedBlob);
                }
                Err(e) => {
                    tracing::warn!("{}: {e} (attempt {attempt} of {RANGE_ATTEMPTS})", what());
                    last = Some(std::io::Error::other(format!("{}: {e}", what())));
                }
            }
        }
        Err(SpanError::Failed(last.expect("at least one attempt")))
    }

    /// The bytes of an eStargz chunk: from the chunk store (stored uncompressed, under the
    /// chunk's digest), or fetched by range, decompressed and verified.
    fn stargz_chunk(&self, layer: &LayerData, chunk: &Chunk) -> std::io::Result<Vec<u8>> {
        if let Some(b) = self.cache.load_chunk(&chunk.digest) {
            self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b.to_vec());
        }
        let what = || {
            format!(
                "eStargz chunk at {} of layer {}",
                chunk.offset, layer.digest
            )
        };
        let mut last = None;
        for attempt in 1..=RANGE_ATTEMPTS {
            let res = match self.read_range(&layer.descriptor, chunk.offset, chunk.end) {
                Ok(Some(bytes)) => {
                    self.stats.ranges.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .range_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    estargz::decode_chunk(chunk, &bytes)
                }
                Ok(None) => Err(Error::Unsupported {
                    what: "source for eStargz chunks".into(),
                    value: format!("{} (it ignores Range)", self.src.name()),
                }),
                Err(e) => Err(e),
            };
            match res {
                Ok(data) => {
                    self.keep_chunk(&chunk.digest, &data);
                    return Ok(data);
                }
                Err(e) => {
                    tracing::warn!(
                        "{}: {e}; not serving it (attempt {attempt} of {RANGE_ATTEMPTS})",
                        what()
                    );
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", what()),
                    ));
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Fetch spans `ks` (consecutive, none of them stored) in one range request, verify each
    /// against its digest as the body streams in, and store the good ones: each span's
    /// reader is let go as soon as that span is in, not when the whole batch is. Best
    /// effort: a span that fails here is fetched again, alone, by the read that needs it.
    ///
    /// Returns the spans of `ks` that did not come in verified.
    fn fetch_batch(&self, li: usize, layer: &LayerData, ks: std::ops::Range<usize>) -> Vec<usize> {
        let all = ks.clone().collect();
        let Ok(sp) = layer.seek() else { return all };
        let size = layer.descriptor.size;
        let mut bounds: Vec<(u64, u64)> = ks.clone().map(|k| sp.span_range(k, size)).collect();
        // No more than MAX_RANGE in one request: the batch is cut short (its first span
        // alone may be more, and is then left to its reader).
        let a = bounds.first().map_or(0, |s| s.0);
        bounds.truncate(bounds.partition_point(|s| s.1.saturating_sub(a) <= MAX_RANGE));
        let ks = ks.start..ks.start + bounds.len();
        let Some(&(_, b)) = bounds.last() else {
            return all;
        };
        // Each span starts inside the one before (they share a byte when a seek point falls
        // inside one) and ends after it; anything else is a malformed index, which the
        // reader's own fetch will report.
        let contiguous = bounds
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[1].0 <= w[0].1 && w[0].1 <= w[1].1);
        if b <= a || !contiguous || bounds.iter().any(|(x, y)| y <= x) {
            return all;
        }
        // Claim every span first, so that readers wait for this fetch instead of repeating it.
        let gates: Vec<_> = ks.clone().map(|k| self.gates.gate((li, k))).collect();
        let mut turns: Vec<_> = gates
            .iter()
            .map(|g| Some(g.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
            .collect();
        let t = std::time::Instant::now();
        let digests: Vec<SpanDigest> = ks.clone().map(|k| sp.span_digests[k]).collect();
        // The body is read and hashed on the runtime (where socket reads are cheap); spans
        // come here one at a time, checked, to be stored and handed to their readers.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, bool, Bytes)>(2);
        let (src, desc, want) = (self.src.clone(), layer.descriptor.clone(), digests.clone());
        let stream_task = self.rt.spawn(async move {
            let Some(mut body) = src.range_stream(&desc, a, b).await? else {
                return Ok::<_, Error>(false);
            };
            let mut i = 0;
            let mut pos = a;
            let mut buf = bufpool::take((bounds[0].1 - bounds[0].0) as usize);
            let mut hasher = blake3::Hasher::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Error::Io {
                    context: format!("reading bytes {a}-{b} of {}", desc.digest),
                    cause: e,
                })?;
                let mut c = &chunk[..];
                while !c.is_empty() && i < bounds.len() {
                    // `buf` holds span i's bytes `[start, pos)`.
                    let (sa, sb) = bounds[i];
                    let take = c.len().min((sb - pos) as usize);
                    hasher.update(&c[..take]);
                    buf.extend_from_slice(&c[..take]);
                    c = &c[take..];
                    pos += take as u64;
                    if pos < sb {
                        continue;
                    }
                    let next = bounds.get(i + 1).map_or(0, |&(na, nb)| (nb - na) as usize);
                    let span = bufpool::freeze(std::mem::replace(&mut buf, bufpool::take(next)));
                    let good = SpanDigest::of_hasher(&hasher) == want[i];
                    hasher.reset();
                    if tx.send((i, good, span.clone())).await.is_err() {
                        return Ok(true);
                    }
                    i += 1;
                    if let Some(&(na, nb)) = bounds.get(i) {
                        let shared = &span[(na - sa) as usize..];
                        debug_assert!(buf.capacity() >= (nb - na) as usize);
                        buf.extend_from_slice(shared);
                        hasher.update(shared);
                    }
                }
                if i == bounds.len() {
                    break;
                }
            }
            Ok(true)
        });
        let mut got = 0u64;
        let mut verified = vec![false; ks.len()];
        while let Some((i, good, span)) = rx.blocking_recv() {
            let k = ks.start + i;
            got += span.len() as u64;
            if good {
                self.keep_chunk(&digests[i], &span);
                verified[i] = true;
            } else {
                tracing::warn!(
                    "read-ahead: span {k} of layer {} does not match its digest; dropped",
                    layer.digest
                );
            }
            // Out of the gates first, then the turn: a waiter wakes to find the span.
            self.gates.done(&(li, k));
            turns[i] = None;
        }
        if got > 0 {
            self.stats.ranges.fetch_add(1, Ordering::Relaxed);
            self.stats.range_bytes.fetch_add(got, Ordering::Relaxed);
        }
        match self.rt.block_on(stream_task) {
            Ok(Ok(true)) => tracing::debug!(
                "read ahead spans {ks:?} ({} bytes) of layer {} in {:.1?}",
                b - a,
                layer.digest,
                t.elapsed()
            ),
            Ok(Ok(false)) => layer.no_ranges.store(true, Ordering::Relaxed),
            Ok(Err(e)) => tracing::debug!("read-ahead of spans {ks:?} of {}: {e}", layer.digest),
            Err(e) => tracing::debug!("read-ahead of spans {ks:?} of {}: {e}", layer.digest),
        }
        // Spans that never came: their readers fetch them alone.
        for (k, turn) in ks.clone().zip(turns.iter_mut()) {
            if turn.is_some() {
                self.gates.done(&(li, k));
                *turn = None;
            }
        }
        all.into_iter()
            .filter(|&k| !ks.contains(&k) || !verified[k - ks.start])
            .collect()
    }

    /// Every span of `layer` into the chunk store (`--prefetch all`): the missing ones in
    /// batches like a sequential reader's; a span a batch did not bring, alone.
    fn fetch_all_spans(&self, li: usize, layer: &LayerData) -> std::io::Result<()> {
        let sp = layer.seek()?;
        let n = sp.span_digests.len();
        let missing = |k: usize| !self.cache.has_chunk(&sp.span_digests[k]);
        let mut k = 0;
        while k < n {
            if !missing(k) {
                k += 1;
                continue;
            }
            let end = (k..n.min(k + READAHEAD_MAX / 2))
                .take_while(|&j| missing(j))
                .last()
                .map_or(k + 1, |j| j + 1);
            let left = if layer.no_ranges.load(Ordering::Relaxed) {
                (k..end).collect()
            } else {
                self.fetch_batch(li, layer, k..end)
            };
            for j in left {
                match self.span(li, layer, j) {
                    Ok(_) => {}
                    Err(SpanError::NeedBlob) => return self.ensure_local(li, layer).map(|_| ()),
                    Err(SpanError::Failed(e)) => return Err(e),
                }
            }
            k = end;
        }
        Ok(())
    }

    /// Store a verified span in the chunk store, keeping the store under its bound. Spans
    /// of local sources are not stored: the source is as near as the store.
    fn keep_chunk<N: crate::cache::ChunkName>(&self, digest: &N, bytes: &[u8]) {
        if self.src.is_local() {
            return;
        }
        if let Err(e) = self.cache.store_chunk(digest, bytes) {
            tracing::warn!("not keeping chunk {digest}: {e}");
            return;
        }
        let mut total = self.chunk_bytes.lock().unwrap();
        let now = match *total {
            Some(t) => t + bytes.len() as u64,
            None => self.cache.chunk_usage(),
        };
        *total = Some(if now > self.chunk_max {
            // Down to 3/4 of the bound, so that trimming is not paid on every store.
            self.cache.trim_chunks(self.chunk_max / 4 * 3)
        } else {
            now
        });
    }

    /// Make sure the layer has its verified blob open, downloading it if needed.
    fn ensure_local<'a>(&self, li: usize, layer: &'a LayerData) -> std::io::Result<&'a File> {
        if let Some(f) = layer.local.get() {
            return Ok(f);
        }
        let gate = self.gates.gate((li, usize::MAX));
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = layer.local.get() {
            return Ok(f);
        }
        self.stats.blob_fallbacks.fetch_add(1, Ordering::Relaxed);
        let path = self
            .rt
            .block_on(self.cache.fetch(&self.src, &layer.descriptor))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let f = File::open(&path)?;
        Ok(layer.local.get_or_init(|| f))
    }
}

/// Read an eStargz layer's TOC: the footer (one small range request), then the TOC from the
/// chunk store or by range, verified against the layer's annotation.
async fn open_stargz(
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    toc_digest: &Digest,
) -> Result<estargz::StargzLayer> {
    let size = desc.size;
    if desc.size_unknown || size < estargz::FOOTER_SIZE {
        return Err(Error::malformed("eStargz layer", "too small for a footer"));
    }
    let no_range = || Error::Unsupported {
        what: "source for eStargz".into(),
        value: format!("{} (it ignores Range)", src.name()),
    };
    let footer = src
        .read_range(desc, size - estargz::FOOTER_SIZE, size)
        .await?
        .ok_or_else(no_range)?;
    let toc_offset = estargz::parse_footer(&footer)?;
    if toc_offset >= size - estargz::FOOTER_SIZE {
        return Err(Error::malformed(
            "eStargz layer",
            "footer points past the TOC",
        ));
    }
    let toc_len = size - estargz::FOOTER_SIZE - toc_offset;
    if toc_len > estargz::MAX_TOC_MEMBER {
        return Err(Error::malformed(
            "eStargz layer",
            format!("its footer puts {toc_len} bytes of TOC before it"),
        ));
    }
    let json = match cache.load_chunk(toc_digest) {
        Some(json) => json.to_vec(),
        None => {
            let member = src
                .read_range(desc, toc_offset, size - estargz::FOOTER_SIZE)
                .await?
                .ok_or_else(no_range)?;
            let json = estargz::toc_json(&member)?;
            let actual = Digest::of(&json);
            if actual != *toc_digest {
                return Err(Error::DigestMismatch {
                    what: format!("eStargz TOC of layer {}", desc.digest),
                    expected: toc_digest.clone(),
                    actual,
                });
            }
            if let Err(e) = cache.store_chunk(toc_digest, &json) {
                tracing::warn!("not keeping the TOC of {}: {e}", desc.digest);
            }
            json
        }
    };
    estargz::parse_toc(&json, toc_offset)
}

impl ImageView {
    /// Load each layer's index from the cache, or build it by streaming the verified blob
    /// (kept only with `keep_blobs`), then merge. Indexes are built concurrently and always
    /// cached. Blobs are not fetched for layers whose index is cached: reads fetch by range.
    pub async fn open(
        cache: &Cache,
        src: Arc<Source>,
        image: &Image,
        opts: &ViewOptions,
    ) -> Result<ImageView> {
        match Self::open_once(cache, src.clone(), image, opts).await? {
            Ok(view) => Ok(view),
            Err((e, published)) => {
                // Each published index was well-formed alone, but together they do not make
                // a tree: forget them and index those layers here.
                tracing::warn!(
                    "the published indexes of {} do not merge ({e}); indexing here instead",
                    image.manifest_digest
                );
                for d in &published {
                    cache.remove_published_index(d);
                }
                let opts = ViewOptions {
                    remote_index: false,
                    ..opts.clone()
                };
                Self::open_once(cache, src, image, &opts)
                    .await?
                    .map_err(|(e, _)| e)
            }
        }
    }

    /// [`ImageView::open`], except that a merge failure with published indexes in use is
    /// returned apart, with the layers they describe, for the caller to retry without them.
    async fn open_once(
        cache: &Cache,
        src: Arc<Source>,
        image: &Image,
        opts: &ViewOptions,
    ) -> Result<std::result::Result<ImageView, (Error, Vec<Digest>)>> {
        let n = match opts.layers {
            Some(n) if n == 0 || n > image.layers.len() => {
                return Err(Error::Unsupported {
                    what: format!("layer count (the image has {} layers)", image.layers.len()),
                    value: n.to_string(),
                });
            }
            Some(n) => n,
            None => image.layers.len(),
        };
        if opts.remote_index {
            let wanted = crate::artifact::layers_wanting_index(cache, &image.layers[..n]);
            // Optional work: a registry that stalls it only costs the time to index here.
            let lookup = crate::artifact::fetch_indexes(cache, &src, image, &wanted);
            if !wanted.is_empty()
                && tokio::time::timeout(REMOTE_INDEX_DEADLINE, lookup)
                    .await
                    .is_err()
            {
                tracing::warn!(
                    "no answer about published indexes within {}s; indexing here",
                    REMOTE_INDEX_DEADLINE.as_secs()
                );
            }
        }
        let src_ref = &src;
        // Largest first: the biggest layer's decompression is usually what the mount waits
        // for, so it must not queue behind small ones when there are more layers than jobs.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(image.layers[i].descriptor.size));
        let mut layers: Vec<(usize, (Arc<LayerData>, bool))> =
            futures_util::stream::iter(order.into_iter().map(|i| (i, &image.layers[i])))
                .map(|(i, layer)| {
                    async move {
                let digest = &layer.descriptor.digest;
                let compression = layer.compression;
                let limits = opts.limits;
                let name = move |e: Error| match e {
                    Error::Malformed { what, reason } => Error::Malformed {
                        what: format!("{what} in layer {} ({})", i + 1, layer.descriptor.digest),
                        reason,
                    },
                    other => other,
                };
                let joined = |e: tokio::task::JoinError| Error::Io {
                    context: "an indexing thread failed".into(),
                    cause: std::io::Error::other(e.to_string()),
                };
                if compression == Compression::Gzip
                    && let Some(toc) = estargz::toc_digest(&layer.descriptor.annotations)
                {
                    let opened = match toc {
                        Ok(toc) => open_stargz(cache, src_ref, &layer.descriptor, &toc).await,
                        Err(e) => Err(e),
                    };
                    match opened {
                        Ok(sg) => {
                            let files = Stargz {
                                chunks: sg.chunks,
                                prefetch: sg.prefetch,
                            };
                            return Ok((LayerData::new(layer, sg.index, Some(files)), false));
                        }
                        // Wrong bytes for what the manifest vouches for: refused.
                        Err(e @ Error::DigestMismatch { .. }) => return Err(name(e)),
                        Err(e) => tracing::warn!(
                            "layer {} ({digest}): not read as eStargz ({e}); indexing it whole",
                            i + 1
                        ),
                    }
                }
                // Decoded on the blocking pool, so that layers decode in parallel.
                // Indexes without seek points (built by `pull`) are rebuilt. One built
                // here is preferred to a published one.
                let (cached, published) = {
                    let (cache, digest) = (cache.clone(), digest.clone());
                    let remote = opts.remote_index;
                    tokio::task::spawn_blocking(move || {
                        let usable = |i: &LayerIndex| i.seek.is_some();
                        match cache.load_index(&digest).filter(usable) {
                            Some(i) => (Some(i), false),
                            None if remote => {
                                let p = cache.load_published_index(&digest).filter(usable);
                                let published = p.is_some();
                                (p, published)
                            }
                            None => (None, false),
                        }
                    })
                    .await
                    .map_err(joined)?
                };
                let fresh = cached.is_none();
                let started = std::time::Instant::now();
                let tell = |p: IndexProgress| {
                    if let Some(sink) = &opts.progress {
                        (sink.0)(&p);
                    }
                };
                if fresh {
                    tell(IndexProgress::Indexing {
                        layer: i + 1,
                        of: n,
                        digest: digest.clone(),
                        bytes: layer.descriptor.size,
                    });
                }
                let (blob, index) = match cached {
                    Some(idx) => {
                        let blob = cache.blob_path(digest);
                        (blob.is_file().then_some(blob), idx)
                    }
                    None if cache.has_blob(digest) => {
                        let blob = cache.blob_path(digest);
                        let f = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
                        let idx = tokio::task::spawn_blocking(move || {
                            build_index(f, compression, limits)
                        })
                        .await
                        .map_err(joined)?
                        .map_err(name)?;
                        (Some(blob), idx)
                    }
                    None => loop {
                        // Index while downloading; the index counts only if the blob verifies.
                        let (tx, rx) = tokio::sync::mpsc::channel(8);
                        let indexing = tokio::task::spawn_blocking(move || {
                            build_index(crate::layer::ChannelReader::new(rx), compression, limits)
                        });
                        let fetched = cache
                            .stream_blob(
                                src_ref,
                                &layer.descriptor,
                                &|_| {},
                                Some(&tx),
                                opts.keep_blobs,
                            )
                            .await;
                        drop(tx);
                        let idx = indexing.await.map_err(joined)?;
                        match fetched {
                            // Wrong bytes from a mirror: once more, from the registry.
                            Err(Error::DigestMismatch { .. }) if src_ref.distrust_mirrors() => {
                                continue;
                            }
                            fetched => break (fetched?, idx.map_err(name)?),
                        }
                    },
                };
                if fresh {
                    tell(IndexProgress::Indexed {
                        layer: i + 1,
                        of: n,
                        entries: index.entries.len(),
                        elapsed: started.elapsed(),
                    });
                    if let Err(e) = cache.store_index(digest, &index) {
                        tracing::warn!("not caching the index of {digest}: {e}");
                    }
                }
                let data = LayerData::new(layer, index, None);
                if let Some(blob) = blob {
                    let f = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
                    // Marks it used, for pruning oldest first.
                    let _ = f.set_modified(std::time::SystemTime::now());
                    let _ = data.local.set(f);
                }
                Ok::<_, Error>((data, published))
            }
            // Tagged with its place, since layers finish in any order.
            .map_ok(move |r| (i, r))
                })
                .buffer_unordered(opts.jobs.max(1))
                .try_collect::<Vec<_>>()
                .await?;
        layers.sort_by_key(|(i, _)| *i);
        let layers: Vec<(Arc<LayerData>, bool)> = layers.into_iter().map(|(_, l)| l).collect();
        let published: Vec<Digest> = layers
            .iter()
            .filter(|(_, p)| *p)
            .map(|(l, _)| l.descriptor.digest.clone())
            .collect();
        let layers: Vec<Arc<LayerData>> = layers.into_iter().map(|(l, _)| l).collect();
        let names: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let refs: Vec<&LayerIndex> = layers.iter().map(|l| &l.index).collect();
        let t = std::time::Instant::now();
        let scoped = opts
            .only_path
            .as_deref()
            .and_then(|p| tree::merge_for_path(&refs, &names, p.as_slice()));
        let merged = match scoped {
            Some(t) => t,
            None => tree::merge(&refs, &names),
        };
        let tree = match merged {
            Ok(t) => t,
            Err(e) if !published.is_empty() => return Ok(Err((e, published))),
            Err(e) => return Err(e),
        };
        tracing::debug!("tree merged in {:.1?}", t.elapsed());
        Ok(Ok(ImageView {
            tree,
            layers,
            fetcher: Arc::new(Fetcher {
                src,
                cache: cache.clone(),
                rt: tokio::runtime::Handle::current(),
                gates: Gates::new(),
                chunk_bytes: Mutex::new(None),
                chunk_max: opts.chunk_cache,
                stats: ReadStats::default(),
            }),
            prefetch: opts.prefetch,
            keep_blobs: opts.keep_blobs,
            spans: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(opts.cached_spans.max(1)).expect("at least one"),
            )),
            inflight: Gates::new(),
        }))
    }

    /// What reads have fetched so far.
    pub fn stats(&self) -> &ReadStats {
        &self.fetcher.stats
    }

    /// How many layers are read by range (their blob is not local).
    pub fn remote_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.local.get().is_none())
            .count()
    }

    /// Start background fetches, returning at once: with [`Prefetch::Auto`], the files an
    /// eStargz layer marks for prefetching; with [`Prefetch::All`], everything not yet local
    /// (whole blobs with `keep_blobs`, every span or chunk into the chunk store otherwise).
    pub fn start_prefetch(&self) {
        if self.prefetch == Prefetch::None || self.fetcher.src.is_local() {
            return;
        }
        let all = self.prefetch == Prefetch::All;
        let remote: u64 = self
            .layers
            .iter()
            .filter(|l| l.local.get().is_none())
            .map(|l| l.descriptor.size)
            .sum();
        if all && !self.keep_blobs && remote > self.fetcher.chunk_max {
            tracing::warn!(
                "prefetching {remote} bytes into a chunk store bounded at {} bytes: \
                 older spans will be dropped (--keep-blobs keeps whole blobs instead)",
                self.fetcher.chunk_max
            );
        }
        for (li, layer) in self.layers.iter().enumerate() {
            if layer.local.get().is_some() || !(all || layer.stargz.is_some()) {
                continue;
            }
            let (fetcher, layer, keep) = (self.fetcher.clone(), layer.clone(), self.keep_blobs);
            self.fetcher.rt.spawn_blocking(move || {
                let t = std::time::Instant::now();
                let res = if let Some(sg) = &layer.stargz {
                    let files: Vec<usize> = if all {
                        (0..sg.chunks.len()).collect()
                    } else {
                        sg.prefetch.clone()
                    };
                    files
                        .iter()
                        .flat_map(|&e| &sg.chunks[e])
                        .try_for_each(|c| fetcher.stargz_chunk(&layer, c).map(|_| ()))
                } else if keep {
                    fetcher.ensure_local(li, &layer).map(|_| ())
                } else {
                    fetcher.fetch_all_spans(li, &layer)
                };
                match res {
                    Ok(()) => {
                        tracing::info!("prefetched layer {} in {:.1?}", layer.digest, t.elapsed())
                    }
                    Err(e) => tracing::warn!("prefetching layer {}: {e}", layer.digest),
                }
            });
        }
    }

    /// Read up to `len` bytes at `offset` of regular file `inode`. Short only at its end.
    pub fn read(&self, inode: InodeId, offset: u64, len: usize) -> Result<Bytes> {
        self.read_inner(inode, offset, len, false)
    }

    /// [`ImageView::read`] for a range that will not be read again (a small file `cat`
    /// prints whole): decompresses no further than its end, and caches nothing.
    pub fn read_once(&self, inode: InodeId, offset: u64, len: usize) -> Result<Bytes> {
        self.read_inner(inode, offset, len, true)
    }

    fn read_inner(&self, inode: InodeId, offset: u64, len: usize, exact: bool) -> Result<Bytes> {
        let ino = &self.tree.inodes[inode as usize];
        let Some(data) = ino.data else {
            return Err(Error::malformed("read", "not a regular file"));
        };
        let layer = &self.layers[data.layer as usize];
        let entry = &layer.index.entries[data.entry as usize];
        if offset >= entry.size {
            return Ok(Bytes::new());
        }
        let len = len.min((entry.size - offset) as usize);
        if let Some(sg) = &layer.stargz {
            return self
                .read_stargz(
                    data.layer as usize,
                    layer,
                    sg,
                    data.entry as usize,
                    offset,
                    len,
                )
                .map(Bytes::from)
                .map_err(|e| Error::Io {
                    context: format!("reading {} from layer {}", entry.path, layer.digest),
                    cause: e,
                });
        }
        let fail = |e: std::io::Error| Error::Io {
            context: format!("reading {:?} from layer {}", entry.path, layer.digest),
            cause: e,
        };
        let li = data.layer as usize;
        let file_end = entry.offset + entry.stored_len();
        if entry.sparse.is_empty() {
            return self
                .read_stored_data(li, layer, entry.offset + offset, len, file_end, exact)
                .map_err(fail);
        }
        // A sparse file: its regions' bytes are stored one after another; holes are zeros.
        let end = offset + len as u64;
        let mut out = Vec::with_capacity(len);
        let mut stored_before = 0u64;
        for r in &entry.sparse {
            let r_end = r.offset + r.len;
            if r_end > offset && r.offset < end && r.len > 0 {
                let from = r.offset.max(offset);
                out.resize((from - offset) as usize, 0);
                let take = (r_end.min(end) - from) as usize;
                let at = entry.offset + stored_before + (from - r.offset);
                let bytes = self
                    .read_stored_data(li, layer, at, take, file_end, exact)
                    .map_err(fail)?;
                out.extend_from_slice(&bytes);
            }
            stored_before += r.len;
        }
        out.resize(len, 0);
        Ok(out.into())
    }

    /// `len` bytes of a layer's uncompressed stream at `start`, for a file whose stored data
    /// ends at `file_end`: from the local blob where there is one, else by span.
    fn read_stored_data(
        &self,
        li: usize,
        layer: &Arc<LayerData>,
        start: u64,
        len: usize,
        file_end: u64,
        exact: bool,
    ) -> std::io::Result<Bytes> {
        if layer.compression == Compression::None
            && let Some(f) = layer.local.get()
        {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, start)?;
            return Ok(buf.into());
        }
        if layer.compression == Compression::Gzip
            && let Some(f) = layer.local.get()
            && let Some(bytes) = layer.read_stored(f, start, len)?
        {
            return Ok(bytes.into());
        }
        self.read_spans(li, layer, start, len, file_end, exact)
    }

    fn span(
        &self,
        key: SpanKey,
        make: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<Bytes> {
        self.span_cached(key, false, make)
    }

    /// [`ImageView::span`]; a piece made `ahead` of its reader goes in as the next to be
    /// evicted, so that pieces made ahead never push out pieces being read (with several
    /// sequential readers they would, and every reader would find its piece gone).
    fn span_cached(
        &self,
        key: SpanKey,
        ahead: bool,
        make: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<Bytes> {
        if let Some(s) = self.spans.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        // Decompress outside the cache lock, so that readers of other spans go on; readers
        // of this span wait at its gate and then find it cached.
        let gate = self.inflight.gate(key);
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _done = Done(&self.inflight, key);
        if let Some(s) = self.spans.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        let made = make().map(bufpool::freeze);
        if let Ok(s) = &made {
            // Cached before the gate goes, so a newcomer finds it rather than a new gate.
            let mut spans = self.spans.lock().unwrap();
            spans.put(key, s.clone());
            if ahead {
                spans.demote(&key);
            }
        }
        made
    }

    /// When a reader has just moved from span `k - 1` into `k` of a file whose data ends at
    /// uncompressed offset `file_end`, make sure the spans of the readahead window after `k`
    /// are stored or coming: when under half of them are, fetch the missing ones in one
    /// request and widen the window. A read elsewhere starts the window over.
    fn read_ahead(&self, li: usize, layer: &Arc<LayerData>, k: usize, file_end: u64) {
        let prev = layer.last_span.swap(k, Ordering::Relaxed);
        let f = &self.fetcher;
        if prev.wrapping_add(1) != k {
            if prev != k {
                layer.window.store(READAHEAD_MIN, Ordering::Relaxed);
            }
            return;
        }
        if self.prefetch == Prefetch::None
            || f.src.is_local()
            || layer.no_ranges.load(Ordering::Relaxed)
        {
            return;
        }
        let Ok(sp) = layer.seek() else { return };
        let n = sp.span_digests.len();
        // Nothing past the spans that hold this file.
        let end = sp
            .span_at(file_end.saturating_sub(1))
            .map_or(n, |j| j + 1)
            .min(n);
        let w = layer.window.load(Ordering::Relaxed);
        let horizon = (k + 1 + w).min(end);
        let ready = |j: usize| f.gates.busy(&(li, j)) || f.cache.has_chunk(&sp.span_digests[j]);
        let first = (k + 1..horizon).find(|&j| !ready(j));
        let Some(first) = first.filter(|&j| j - (k + 1) < w / 2) else {
            return;
        };
        let last = (first..horizon)
            .take_while(|&j| !ready(j))
            .last()
            .unwrap_or(first);
        layer
            .window
            .store((w * 2).min(READAHEAD_MAX), Ordering::Relaxed);
        let (fetcher, layer) = (f.clone(), layer.clone());
        f.rt.spawn_blocking(move || {
            // Best effort: what did not come is fetched by the read that needs it.
            let _ = fetcher.fetch_batch(li, &layer, first..last + 1);
        });
    }

    /// Read `len` bytes at `offset` of eStargz file `entry`, chunk by chunk.
    fn read_stargz(
        &self,
        li: usize,
        layer: &LayerData,
        sg: &Stargz,
        entry: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let chunks = &sg.chunks[entry];
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let c = chunks
                .partition_point(|c| c.file_offset <= pos)
                .checked_sub(1)
                .map(|i| &chunks[i])
                .ok_or_else(|| std::io::Error::other("no chunk holds this offset"))?;
            let piece = self.span((li as u32, c.offset), || {
                self.fetcher.stargz_chunk(layer, c)
            })?;
            let at = (pos - c.file_offset) as usize;
            if at >= piece.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file's chunks end before the file does",
                ));
            }
            let take = (len - out.len()).min(piece.len() - at);
            out.extend_from_slice(&piece[at..at + take]);
            pos += take as u64;
        }
        Ok(out)
    }

    fn read_spans(
        &self,
        li: usize,
        layer: &Arc<LayerData>,
        start: u64,
        len: usize,
        file_end: u64,
        exact: bool,
    ) -> std::io::Result<Bytes> {
        let sp = layer.seek()?;
        // Filled only by a read that crosses pieces; one inside a piece is a slice of it.
        let mut out = Vec::new();
        let mut pos = start;
        while pos < start + len as u64 {
            let (k, piece_start, piece_len) = piece_at(sp, layer.data_end, pos)?;
            // A read that will not come again (`read_once`) decompresses only up to its end
            // and keeps nothing; others decompress and keep the whole piece.
            let piece = if exact {
                let want = (start + len as u64 - piece_start).min(piece_len as u64) as usize;
                bufpool::freeze(self.make_piece(li, layer, k, piece_start, want, file_end)?)
            } else {
                self.span((li as u32, piece_start), || {
                    self.make_piece(li, layer, k, piece_start, piece_len, file_end)
                })?
            };
            let at = (pos - piece_start) as usize;
            if at >= piece.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "layer ends before the file does",
                ));
            }
            let take = ((start + len as u64 - pos) as usize).min(piece.len() - at);
            if pos == start && take == len {
                return Ok(piece.slice(at..at + take));
            }
            out.extend_from_slice(&piece[at..at + take]);
            pos += take as u64;
        }
        Ok(out.into())
    }

    /// Decompress `want` bytes from `from` (inside span `k`, for a file whose data ends at
    /// `file_end`): from the local blob, or from the span fetched by range (verified), or
    /// from the blob once a range would not do.
    fn make_piece(
        &self,
        li: usize,
        layer: &Arc<LayerData>,
        k: usize,
        from: u64,
        want: usize,
        file_end: u64,
    ) -> std::io::Result<Vec<u8>> {
        if let Some(f) = layer.local.get() {
            return layer.decompress_local(f, from, want);
        }
        let sp = layer.seek()?;
        self.read_ahead(li, layer, k, file_end);
        match self.fetcher.span(li, layer, k) {
            Ok(bytes) => {
                let (a, _) = sp.span_range(k, layer.descriptor.size);
                let mut r = SpanBytes::new(a, bytes);
                decompress_at(&mut r, layer.compression, sp, from, want)
            }
            Err(SpanError::Failed(e)) => Err(e),
            Err(SpanError::NeedBlob) => {
                let f = self.fetcher.ensure_local(li, layer)?;
                layer.decompress_local(f, from, want)
            }
        }
    }

    /// Called after answering a read of `len` bytes at `offset` of file `inode`: when reads
    /// of its layer go sequentially and this one has passed the middle of its piece, the
    /// next piece is decompressed now, by the thread that answered, so that the reader
    /// finds it ready instead of waiting for it (with two cores, serving one piece and
    /// decompressing the next overlap). Nothing happens for other reads, when that piece
    /// is cached or being made, or, with `--prefetch none`, when it would be fetched.
    pub fn read_on(&self, inode: InodeId, offset: u64, len: usize) {
        let Some(data) = self.tree.inodes[inode as usize].data else {
            return;
        };
        let li = data.layer as usize;
        let layer = &self.layers[li];
        let entry = &layer.index.entries[data.entry as usize];
        let local = layer.local.get().is_some();
        // Sparse files are rare: their reads are not worth a second mapping here.
        if layer.stargz.is_some()
            || !entry.sparse.is_empty()
            || (layer.compression == Compression::None && local)
            || (self.prefetch == Prefetch::None && !local)
        {
            return;
        }
        let start = entry.offset + offset;
        let prev = layer.last_end.swap(start + len as u64, Ordering::Relaxed);
        // Readahead sends a few reads at once, so "sequential" allows some reordering.
        if prev.abs_diff(start) > seek::SPAN {
            return;
        }
        let Ok(sp) = layer.seek() else { return };
        let Ok((_, cur_start, cur_len)) = piece_at(sp, layer.data_end, start) else {
            return;
        };
        let next = cur_start + cur_len as u64;
        if start + (len as u64) < cur_start + cur_len as u64 / 2
            || next >= entry.offset + entry.stored_len()
        {
            return;
        }
        let Ok((k, piece_start, piece_len)) = piece_at(sp, layer.data_end, next) else {
            return;
        };
        let key = (li as u32, piece_start);
        if self.inflight.busy(&key) || self.spans.lock().unwrap().contains(&key) {
            return;
        }
        // Stored blocks are read straight from the blob: nothing to make ahead.
        if layer.compression == Compression::Gzip
            && let Some(f) = layer.local.get()
            && let Ok(Some(run)) = layer.stored(f, sp, k)
            && run.covers(piece_start, 1)
        {
            return;
        }
        let file_end = entry.offset + entry.stored_len();
        if let Err(e) = self.span_cached(key, true, || {
            self.make_piece(li, layer, k, piece_start, piece_len, file_end)
        }) {
            tracing::debug!("decompressing ahead in layer {}: {e}", layer.digest);
        }
    }
}

/// The span holding uncompressed offset `pos`, and the piece of it that does (see
/// [`piece_of`]): (span, piece start, piece length). The last span, whose end the seek
/// points do not give, is taken to end with the layer's file data (`data_end`), so that
/// its short tail joins a piece too.
fn piece_at(sp: &SeekPoints, data_end: u64, pos: u64) -> std::io::Result<(usize, u64, usize)> {
    let k = sp
        .span_at(pos)
        .ok_or_else(|| std::io::Error::other("no seek point before the requested offset"))?;
    let (cp_start, cp_end) = sp.span_output(k);
    let cp_end = cp_end.or(Some(data_end).filter(|&e| e > pos));
    let (start, len) = piece_of(cp_start, cp_end, pos);
    Ok((k, start, len))
}

/// The piece of span `[cp_start, cp_end)` (`None`: to the end of the layer) that holds
/// uncompressed offset `pos`, as (start, length). Pieces are the unit decompressed and
/// cached: [`seek::SPAN`] bytes aligned from the seek point, however far apart seek points
/// are (a single-frame zstd layer has only one). A span's tail shorter than a quarter piece
/// is part of the piece before it: as a piece of its own, reaching it would mean
/// decompressing the whole piece before it again (seek points are a little over SPAN
/// apart, so every span would cost two decompressions of it).
fn piece_of(cp_start: u64, cp_end: Option<u64>, pos: u64) -> (u64, usize) {
    let span = seek::SPAN;
    let i = (pos - cp_start) / span;
    let Some(end) = cp_end else {
        return (cp_start + i * span, span as usize);
    };
    let whole = (end - cp_start) / span;
    let last = if whole > 0 && (end - cp_start) % span <= span / 4 {
        whole - 1
    } else {
        whole
    };
    let piece_start = cp_start + i.min(last) * span;
    let piece_end = if i >= last { end } else { piece_start + span };
    (piece_start, (piece_end - piece_start) as usize)
}

#[cfg(test)]
mod tests {
    use super::{Compression, SeekPoints, decompress_at, piece_of};
    use crate::bufpool;
    use crate::layer::seek::SPAN;

    #[test]
    fn a_reused_piece_buffer_never_adds_old_bytes() {
        // An uncompressed span is appended to the buffer it is given: bytes left in a
        // reused one would be served as file data.
        let data: Vec<u8> = (0..SPAN as usize).map(|i| (i % 251) as u8).collect();
        let sp = SeekPoints {
            checkpoints: Vec::new(),
            span_digests: Vec::new(),
        };
        for round in 0..3 {
            let mut dirty = Vec::with_capacity(bufpool::CAP);
            dirty.extend_from_slice(&[0xEE; 1000]);
            bufpool::put_dirty(dirty);
            let got = decompress_at(
                &mut std::io::Cursor::new(&data[..]),
                Compression::None,
                &sp,
                0,
                data.len(),
            )
            .unwrap();
            assert!(got == data, "round {round}");
            // and a piece's buffer goes back for the next round
            drop(bufpool::freeze(got));
        }
    }

    /// The pieces met walking a span byte range by byte range: (start, len) each.
    fn pieces(cp_start: u64, cp_end: Option<u64>, upto: u64) -> Vec<(u64, usize)> {
        let mut out: Vec<(u64, usize)> = Vec::new();
        let mut pos = cp_start;
        while pos < upto {
            let p = piece_of(cp_start, cp_end, pos);
            assert!(p.0 <= pos && pos < p.0 + p.1 as u64, "{pos} outside {p:?}");
            if out.last() != Some(&p) {
                out.push(p);
            }
            pos += 64 << 10;
        }
        out
    }

    #[test]
    fn a_span_a_little_over_a_piece_is_one_piece() {
        // gzip seek points land a deflate block after each SPAN of output
        let end = 1000 + SPAN + 70_000;
        assert_eq!(
            pieces(1000, Some(end), end),
            vec![(1000, (SPAN + 70_000) as usize)]
        );
    }

    #[test]
    fn long_spans_are_cut_in_pieces_that_tile_them() {
        for extra in [0, 1, SPAN / 4, SPAN / 4 + 1, SPAN / 2, SPAN - 1] {
            let end = 5 + 3 * SPAN + extra;
            let ps = pieces(5, Some(end), end);
            assert_eq!(ps[0].0, 5);
            for w in ps.windows(2) {
                assert_eq!(w[0].0 + w[0].1 as u64, w[1].0, "gap or overlap ({extra})");
            }
            let last = ps.last().unwrap();
            assert_eq!(
                last.0 + last.1 as u64,
                end,
                "pieces end with the span ({extra})"
            );
            // a short tail joins the piece before it; a longer one is a piece of its own
            let expect = if extra == 0 || extra > SPAN / 4 {
                3 + (extra > 0) as usize
            } else {
                3
            };
            assert_eq!(ps.len(), expect, "extra {extra}");
        }
    }

    #[test]
    fn an_open_ended_span_has_span_sized_pieces() {
        let ps = pieces(0, None, 3 * SPAN);
        assert_eq!(
            ps,
            vec![
                (0, SPAN as usize),
                (SPAN, SPAN as usize),
                (2 * SPAN, SPAN as usize)
            ]
        );
    }
}
