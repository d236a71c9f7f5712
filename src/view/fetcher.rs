//! Range fetching for a view: compressed spans and TOC chunks (eStargz, zstd:chunked) fetched by range, verified
//! (span by span as a batch streams in), kept in the cache's chunk store within its bound;
//! a whole blob fetched once where a source ignores ranges.

use std::fs::File;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::batch::{BatchSpan, batch_bounds, stream_spans};
use super::gates::Done;
use super::readahead::READAHEAD_MAX;
use super::{Gates, LayerData, ReadStats};
use crate::cache::Cache;
use crate::digest::SpanDigest;
use crate::error::{Error, Result};
use crate::layer::format::Chunk;
use crate::obtain::TocFiles;

/// A span bigger than this (a single-frame zstd layer has one span) is not fetched by
/// range: the layer's blob is downloaded instead.
pub(super) const MAX_RANGE: u64 = 64 << 20;
/// Attempts at one range (a cut connection, or bytes that did not match their digest).
pub(super) const RANGE_ATTEMPTS: u32 = 3;
/// Compressed bytes fetched for a missing TOC chunk: it and the chunks after it in the blob,
/// up to this much. Builders lay files out in directory order, so the next files a program
/// reads (a package's modules) are usually next in the blob; one round trip brings them.
const TOC_REGION: u64 = 512 << 10;

/// What reads share with background fetches: the source, the cache and the single-flight
/// gates that keep one span from being fetched twice at once.
pub(super) struct Fetcher {
    pub(super) cache: Cache,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) gates: Gates<(u32, usize)>,
    /// The same for TOC chunks, by (layer, compressed offset): a read waits for a chunk a
    /// background fetch (prefetch, a profile) is already bringing.
    pub(super) chunk_gates: Gates<(u32, u64)>,
    /// Bytes in the chunk store (measured at the first store, then counted) and its bound.
    pub(super) chunk_bytes: Mutex<Option<u64>>,
    pub(super) chunk_max: u64,
    pub(super) stats: ReadStats,
}

/// Why a span could not be fetched by range.
pub(super) enum SpanError {
    /// Only the whole blob will do (ranges ignored, or the span is too big).
    NeedBlob,
    Failed(std::io::Error),
}

impl Fetcher {
    /// Bytes `[a, b)` of a blob from the source. The request runs as a task on the runtime's
    /// workers, where socket readiness is cheap; waiting on it from this (blocking) thread
    /// costs one wake-up instead of one per body chunk (BENCHMARKS.md).
    pub(super) fn read_range(&self, layer: &LayerData, a: u64, b: u64) -> Result<Option<Bytes>> {
        let (src, desc) = (layer.src.clone(), layer.descriptor.clone());
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
    pub(super) fn span(
        &self,
        layer: &LayerData,
        k: usize,
    ) -> std::result::Result<Bytes, SpanError> {
        let sp = layer.seek().map_err(SpanError::Failed)?;
        let digest = sp.span_digests.get(k).ok_or_else(|| {
            SpanError::Failed(std::io::Error::other("index has no digest for this span"))
        })?;
        if let Some(b) = self.stored_chunk(digest) {
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
        let gate = self.gates.gate((layer.id, k));
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropped before `_turn`: however this ends, the gate goes with the turn.
        let _done = Done(&self.gates, (layer.id, k));
        if let Some(b) = self.stored_chunk(digest) {
            return Ok(b);
        }
        self.fetch_span(layer, k, (a, b), digest)
    }

    /// Span `k`, bytes `[a, b)` of `layer`'s blob, fetched by range and checked against
    /// `digest`, up to [`RANGE_ATTEMPTS`] times; kept in the chunk store when it verifies.
    /// The caller holds the span's gate.
    fn fetch_span(
        &self,
        layer: &LayerData,
        k: usize,
        (a, b): (u64, u64),
        digest: &SpanDigest,
    ) -> std::result::Result<Bytes, SpanError> {
        let what = || format!("span {k} (bytes {a}-{b}) of layer {}", layer.digest);
        let mut last = None;
        for attempt in 1..=RANGE_ATTEMPTS {
            let t = std::time::Instant::now();
            match self.read_range(layer, a, b) {
                Ok(Some(bytes)) => {
                    self.count_range(bytes.len() as u64);
                    let actual = SpanDigest::of(&bytes);
                    if actual == *digest {
                        tracing::debug!("fetched {} in {:.1?}", what(), t.elapsed());
                        self.keep_chunk(layer, digest, &bytes);
                        return Ok(bytes);
                    }
                    tracing::warn!(
                        "{} from {}: digest mismatch (expected {digest}, got {actual}); \
                         not serving it (attempt {attempt} of {RANGE_ATTEMPTS})",
                        what(),
                        layer.src.name()
                    );
                    layer.src.distrust_mirrors();
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
                        layer.src.name(),
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

    /// A chunk (a span or an eStargz chunk) from the chunk store, counted as a hit.
    fn stored_chunk<N: crate::cache::ChunkName>(&self, digest: &N) -> Option<Bytes> {
        let b = self.cache.load_chunk(digest)?;
        self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
        Some(b)
    }

    /// Count one range request that brought `bytes`.
    pub(super) fn count_range(&self, bytes: u64) {
        self.stats.ranges.fetch_add(1, Ordering::Relaxed);
        self.stats.range_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The bytes of a TOC layer's chunk (eStargz, zstd:chunked): from the chunk store (stored
    /// uncompressed, under the chunk's digest), or fetched by range, decoded and verified —
    /// with the missing chunks after it in the blob, within [`TOC_REGION`], in the same
    /// request, each verified and kept on its own.
    pub(super) fn toc_chunk(&self, layer: &LayerData, chunk: &Chunk) -> std::io::Result<Vec<u8>> {
        self.toc_chunk_with(layer, chunk, true)
    }

    /// The same, fetching no neighbours: for background work that knows exactly which
    /// chunks it wants (prefetch lists).
    pub(super) fn toc_chunk_exact(
        &self,
        layer: &LayerData,
        chunk: &Chunk,
    ) -> std::io::Result<Vec<u8>> {
        self.toc_chunk_with(layer, chunk, false)
    }

    fn toc_chunk_with(
        &self,
        layer: &LayerData,
        chunk: &Chunk,
        neighbours: bool,
    ) -> std::io::Result<Vec<u8>> {
        if chunk.zeros {
            // The TOC says so, and the TOC is verified.
            return Ok(vec![0; chunk.size as usize]);
        }
        if let Some(b) = self.stored_chunk(&chunk.digest) {
            return Ok(b.to_vec());
        }
        let gate = self.chunk_gates.gate((layer.id, chunk.offset));
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Dropped before `_turn`: however this ends, the gate goes with the turn.
        let _done = Done(&self.chunk_gates, (layer.id, chunk.offset));
        if let Some(b) = self.stored_chunk(&chunk.digest) {
            return Ok(b.to_vec());
        }
        let format = layer.toc.as_ref().map_or("TOC", |t| t.format.name());
        let what = || {
            format!(
                "{format} chunk at {} of layer {}",
                chunk.offset, layer.digest
            )
        };
        let mut last = None;
        for attempt in 1..=RANGE_ATTEMPTS {
            // The first try brings the chunk's neighbours too; a retry, the chunk alone.
            let region = match &layer.toc {
                Some(toc) if attempt == 1 && neighbours => self.toc_region(toc, chunk),
                _ => Vec::new(),
            };
            let end = region.last().map_or(chunk.end, |c| c.end.max(chunk.end));
            let res = match self.read_range(layer, chunk.offset, end) {
                Ok(Some(bytes)) => {
                    self.count_range(bytes.len() as u64);
                    let own = (chunk.end - chunk.offset) as usize;
                    match &layer.toc {
                        Some(toc) => {
                            self.keep_region(layer, toc, chunk.offset, &bytes, &region);
                            toc.format
                                .decode_chunk(chunk, &bytes[..own.min(bytes.len())])
                        }
                        None => Err(Error::malformed("layer", "chunks of a layer without a TOC")),
                    }
                }
                Ok(None) => Err(Error::Unsupported {
                    what: format!("source for {format} chunks"),
                    value: format!("{} (it ignores Range)", layer.src.name()),
                }),
                Err(e) => Err(e),
            };
            match res {
                Ok(data) => {
                    self.keep_chunk(layer, &chunk.digest, &data);
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

    /// The chunks to fetch with `chunk`, which is missing: those after it in the blob, up
    /// to [`TOC_REGION`] from its start, until one that is stored.
    fn toc_region<'a>(&self, toc: &'a TocFiles, chunk: &Chunk) -> Vec<&'a Chunk> {
        let order = &toc.by_offset;
        let from = order.partition_point(|&at| toc.chunk(at).offset <= chunk.offset);
        order[from..]
            .iter()
            .map(|&at| toc.chunk(at))
            .take_while(|c| {
                c.end.saturating_sub(chunk.offset) <= TOC_REGION && !self.cache.has_chunk(&c.digest)
            })
            .collect()
    }

    /// Decode, verify and keep each chunk of `region` from `bytes` (the blob from `start`).
    /// Best effort: a neighbour that does not decode is fetched by the read that needs it.
    fn keep_region(
        &self,
        layer: &LayerData,
        toc: &TocFiles,
        start: u64,
        bytes: &[u8],
        region: &[&Chunk],
    ) {
        for c in region {
            let (a, b) = ((c.offset - start) as usize, (c.end - start) as usize);
            // Chunks are in offset order, but one may end past the bytes fetched.
            let Some(raw) = bytes.get(a..b) else { continue };
            match toc.format.decode_chunk(c, raw) {
                Ok(data) => self.keep_chunk(layer, &c.digest, &data),
                Err(e) => tracing::debug!("chunk at {} of layer {}: {e}", c.offset, layer.digest),
            }
        }
    }

    /// Fetch spans `ks` (consecutive, none of them stored) in one range request, verify each
    /// against its digest as the body streams in, and store the good ones: each span's
    /// reader is let go as soon as that span is in, not when the whole batch is. Best
    /// effort: a span that fails here is fetched again, alone, by the read that needs it.
    ///
    /// Returns the spans of `ks` that did not come in verified.
    pub(super) fn fetch_batch(&self, layer: &LayerData, ks: Range<usize>) -> Vec<usize> {
        let all: Vec<usize> = ks.clone().collect();
        let Ok(sp) = layer.seek() else { return all };
        let stored = |k: usize| self.cache.has_chunk(&sp.span_digests[k]);
        // Only the first run of missing spans: another fetch (a read, the readahead, a
        // profile) may have brought some; what lies after the run is fetched by its reads.
        let Some(lo) = ks.clone().find(|&k| !stored(k)) else {
            return Vec::new();
        };
        let hi = (lo..ks.end).find(|&k| stored(k)).unwrap_or(ks.end);
        let Some((ks, bounds)) = batch_bounds(sp, layer.descriptor.size, lo..hi) else {
            return all.into_iter().filter(|&k| !stored(k)).collect();
        };
        let (a, b) = (bounds[0].0, bounds[bounds.len() - 1].1);
        // Claim every span first, so that readers wait for this fetch instead of repeating it.
        let gates: Vec<_> = ks.clone().map(|k| self.gates.gate((layer.id, k))).collect();
        let mut turns: Vec<_> = gates
            .iter()
            .map(|g| Some(g.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
            .collect();
        // A fetch that held some of these gates may have stored their spans meanwhile:
        // leave the gates and start over with what is still missing — a shorter run, since
        // all of this one was missing a moment ago, so this ends.
        if ks.clone().any(stored) {
            for (k, turn) in ks.clone().zip(turns.iter_mut()) {
                self.gates.done(&(layer.id, k));
                *turn = None;
            }
            let missing = self.fetch_batch(layer, ks.clone());
            return all
                .into_iter()
                .filter(|&k| missing.contains(&k) || (!ks.contains(&k) && !stored(k)))
                .collect();
        }
        let t = std::time::Instant::now();
        let windows = self.start_windows(layer, ks.clone());
        let digests: Vec<SpanDigest> = ks.clone().map(|k| sp.span_digests[k]).collect();
        // The body is read and hashed on the runtime (where socket reads are cheap); spans
        // come here one at a time, checked, to be stored and handed to their readers.
        let (tx, rx) = tokio::sync::mpsc::channel::<BatchSpan>(2);
        let (src, desc, want) = (layer.src.clone(), layer.descriptor.clone(), digests.clone());
        let stream_task = self.rt.spawn(stream_spans(src, desc, bounds, want, tx));
        // The windows (small, asked for at the same time) are kept before the first span
        // is handed over, so that its readers find both.
        if let Some(w) = windows {
            self.finish_windows(layer, w);
        }
        let verified = self.receive_spans(layer, &ks, &digests, rx, &mut turns);
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
                self.gates.done(&(layer.id, k));
                *turn = None;
            }
        }

        all.into_iter()
            .filter(|&k| match k.checked_sub(ks.start) {
                Some(i) if ks.contains(&k) => !verified[i],
                _ => !stored(k),
            })
            .collect()
    }

    /// Take a batch's spans as [`stream_spans`] sends them (the `i`th is span
    /// `ks.start + i`): store each that verified, and let its readers go at once by
    /// leaving its gate and dropping its turn. Returns which spans verified.
    fn receive_spans(
        &self,
        layer: &LayerData,
        ks: &Range<usize>,
        digests: &[SpanDigest],
        mut rx: tokio::sync::mpsc::Receiver<BatchSpan>,
        turns: &mut [Option<std::sync::MutexGuard<'_, ()>>],
    ) -> Vec<bool> {
        let mut got = 0u64;
        let mut verified = vec![false; ks.len()];
        while let Some((i, good, span)) = rx.blocking_recv() {
            let k = ks.start + i;
            got += span.len() as u64;
            if good {
                self.keep_chunk(layer, &digests[i], &span);
                verified[i] = true;
            } else {
                tracing::warn!(
                    "read-ahead: span {k} of layer {} does not match its digest; dropped",
                    layer.digest
                );
            }
            // Out of the gates first, then the turn: a waiter wakes to find the span.
            self.gates.done(&(layer.id, k));
            turns[i] = None;
        }
        if got > 0 {
            self.count_range(got);
        }
        verified
    }

    /// Every span of `layer` into the chunk store (`--prefetch all`): the missing ones in
    /// batches like a sequential reader's; a span a batch did not bring, alone.
    pub(super) fn fetch_all_spans(
        &self,
        layer: &LayerData,
        stop: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        let sp = layer.seek()?;
        let n = sp.span_digests.len();
        let missing = |k: usize| !self.cache.has_chunk(&sp.span_digests[k]);
        let mut k = 0;
        while k < n && !stop.is_cancelled() {
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
                self.fetch_batch(layer, k..end)
            };
            for j in left {
                match self.span(layer, j) {
                    Ok(_) => {}
                    Err(SpanError::NeedBlob) => return self.ensure_local(layer).map(|_| ()),
                    Err(SpanError::Failed(e)) => return Err(e),
                }
            }
            k = end;
        }
        Ok(())
    }

    /// Store a verified span in the chunk store, keeping the store under its bound. Spans
    /// of local sources are not stored: the source is as near as the store.
    pub(super) fn keep_chunk<N: crate::cache::ChunkName>(
        &self,
        layer: &LayerData,
        digest: &N,
        bytes: &[u8],
    ) {
        if layer.src.is_local() {
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
    pub(super) fn ensure_local<'a>(&self, layer: &'a LayerData) -> std::io::Result<&'a File> {
        if let Some(f) = layer.local.get() {
            return Ok(f);
        }
        let gate = self.gates.gate((layer.id, usize::MAX));
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = layer.local.get() {
            return Ok(f);
        }
        self.stats.blob_fallbacks.fetch_add(1, Ordering::Relaxed);
        let path = self
            .rt
            .block_on(crate::fetch::blob(
                &self.cache,
                &layer.src,
                &layer.descriptor,
            ))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let f = File::open(&path)?;
        Ok(layer.local.get_or_init(|| f))
    }
}
