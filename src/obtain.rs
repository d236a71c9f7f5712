//! One way to obtain a layer's index, for every command: the cache (an index without seek
//! points, as `pull` writes them, is rebuilt), else a published index artifact (`artifact`
//! fetched it beforehand), else the layer's own TOC (eStargz), else by streaming the verified
//! blob once and indexing it as it arrives (its spans then left in the chunk store for the
//! reads that follow). `view` opens layers through it, `index build`
//! fills the cache with it, and `pull` asks it only for what is cached (its extraction is
//! its indexing).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::Cache;
use crate::digest::{Digest, SpanDigest};
use crate::error::{Error, IoContext, Result};
use crate::fetch::Keep;
use crate::index::seek_points::SPAN;
use crate::index::{self, LayerIndex, SeekPoints};
use crate::layer::format::{Chunk, TocFormat, build_index, toc_format};
use crate::manifest::{Descriptor, Layer};
use crate::source::Source;

/// How a layer's index may be obtained.
#[derive(Clone, Debug)]
pub struct Options {
    /// Use an index published in the registry (fetched beforehand by `artifact`).
    pub remote_index: bool,
    /// Keep the whole blob in the cache when streaming it to index it.
    pub keep_blobs: bool,
    /// Limits on the layer's uncompressed stream.
    pub limits: index::Limits,
    /// Told when a layer is indexed here (it can take a while).
    pub progress: Option<ProgressSink>,
    /// Uncompressed bytes between the seek points of a layer indexed here: a read fetches
    /// and decompresses at most about this much more than it asked for.
    pub span: u64,
    /// With `Some(bound)`, a registry's blob streamed to index it (and not kept whole)
    /// leaves its spans in the chunk store, within `bound` bytes in all, so that the first
    /// reads after a cold open fetch nothing again.
    pub keep_spans: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            remote_index: false,
            keep_blobs: false,
            limits: index::Limits::default(),
            progress: None,
            span: SPAN,
            keep_spans: None,
        }
    }
}

/// What [`layer_index`] tells its [`ProgressSink`].
#[derive(Clone, Debug)]
pub enum IndexProgress {
    /// Layer `layer` (1-based, of `of`) is being indexed here: streamed once, `bytes` long.
    Indexing {
        layer: usize,
        of: usize,
        digest: Digest,
        bytes: u64,
    },
    /// `done` of its `bytes` have streamed (told about once a second: over a slow link a
    /// layer takes a while).
    Streamed {
        layer: usize,
        of: usize,
        done: u64,
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

/// The files of a layer read through its TOC: each entry's chunks.
pub struct TocFiles {
    pub format: &'static dyn TocFormat,
    /// By entry position (empty for all but non-empty files).
    pub chunks: Vec<Vec<Chunk>>,
    /// Entries the image's builder wants read first.
    pub prefetch: Vec<usize>,
    /// Every chunk that is fetched (not a run of zeros), as (entry, chunk) positions in
    /// `chunks`, in the order of their bytes in the blob: a read fetches its neighbours too.
    pub by_offset: Vec<(u32, u32)>,
}

impl TocFiles {
    pub fn new(
        format: &'static dyn TocFormat,
        chunks: Vec<Vec<Chunk>>,
        prefetch: Vec<usize>,
    ) -> TocFiles {
        let mut by_offset: Vec<(u32, u32)> = chunks
            .iter()
            .enumerate()
            .flat_map(|(e, cs)| {
                cs.iter()
                    .enumerate()
                    .filter(|(_, c)| !c.zeros)
                    .map(move |(j, _)| (e as u32, j as u32))
            })
            .collect();
        by_offset.sort_by_key(|&(e, j)| chunks[e as usize][j as usize].offset);
        TocFiles {
            format,
            chunks,
            prefetch,
            by_offset,
        }
    }

    pub fn chunk(&self, at: (u32, u32)) -> &Chunk {
        &self.chunks[at.0 as usize][at.1 as usize]
    }
}

/// A layer's index and what came with it.
pub struct Obtained {
    pub index: LayerIndex,
    /// For a layer read through its TOC: its chunks (the index has no seek points then).
    pub toc: Option<TocFiles>,
    /// The verified blob in the cache, when there is one.
    pub blob: Option<PathBuf>,
    /// The index is a published one (if published indexes do not merge, a view opens the
    /// image again without them).
    pub published: bool,
    /// The layer was streamed here to index it, so spans of it may have gone into the chunk
    /// store (`Options::keep_spans`) behind the back of whoever counts that store's bytes.
    pub streamed: bool,
}

/// How long looking for published layer indexes may take before layers are indexed here.
pub const REMOTE_INDEX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Look for published indexes of those of `layers` (of `image`) with none in the cache, and
/// cache what is found (`crate::artifact`), for [`layer_index`] to use with `remote_index`.
/// Optional work: a registry that does not answer within [`REMOTE_INDEX_DEADLINE`] only costs
/// the time to index here, and errors are the artifact module's to log.
///
/// With `want_profile` (a mount that replays it), the access profile published with the
/// indexes comes too, when none is cached and the mount is cold (an index or a TOC to
/// fetch): a warm mount makes no request for it.
pub async fn fetch_published(
    cache: &Cache,
    src: &Source,
    image: &Digest,
    layers: &[Layer],
    want_profile: bool,
) -> Fetched {
    let wanted = crate::artifact::layers_wanting_index(cache, layers);
    let toc_to_fetch = || {
        layers.iter().any(|l| {
            matches!(toc_format(l.compression, &l.descriptor.annotations),
                Some((_, Ok(toc))) if !cache.has_chunk(&toc))
        })
    };
    let want_profile = want_profile
        && cache.load_published_profile(image).is_none()
        && (!wanted.is_empty() || toc_to_fetch());
    if wanted.is_empty() && !want_profile {
        return Fetched::new();
    }
    let lookup = crate::artifact::fetch_indexes(cache, src, image, &wanted, want_profile);
    match tokio::time::timeout(REMOTE_INDEX_DEADLINE, lookup).await {
        Ok(fetched) => fetched.into_iter().collect(),
        Err(_) => {
            tracing::warn!(
                "no answer about published indexes within {}s; indexing here",
                REMOTE_INDEX_DEADLINE.as_secs()
            );
            Fetched::new()
        }
    }
}

/// Whether [`fetch_published`] would look for an index of one of `layers` (one with no
/// TOC and none cached). When it would not, it looks only for the access profile, which
/// nothing opening the layers waits for: that lookup can run beside them.
pub fn wants_published_index(cache: &Cache, layers: &[Layer]) -> bool {
    !crate::artifact::layers_wanting_index(cache, layers).is_empty()
}

/// The indexes [`fetch_published`] just stored, decoded, by layer: a view opening now
/// hands each to [`layer_index`] rather than decoding the cached copy again.
pub type Fetched = HashMap<Digest, LayerIndex>;

/// The index of `layer` (layer `place.0 + 1` of `place.1`, for messages and progress);
/// `fetched` is its published index if [`fetch_published`] just stored it.
pub async fn layer_index(
    cache: &Cache,
    src: &Source,
    layer: &Layer,
    place: (usize, usize),
    opts: &Options,
    fetched: Option<LayerIndex>,
) -> Result<Obtained> {
    let (i, _) = place;
    let digest = &layer.descriptor.digest;
    if let Some(obtained) = from_toc(cache, src, layer, i).await? {
        return Ok(obtained);
    }
    let found = match fetched.filter(|_| opts.remote_index) {
        Some(index) => Some((index, true)),
        // Decoded on the blocking pool, so that layers decode in parallel.
        None => {
            let (cache, digest, remote) = (cache.clone(), digest.clone(), opts.remote_index);
            tokio::task::spawn_blocking(move || cached(&cache, &digest, remote))
                .await
                .map_err(Error::worker)?
        }
    };
    if let Some((index, published)) = found {
        let blob = cache.blob_path(digest);
        return Ok(Obtained {
            index,
            toc: None,
            blob: blob.is_file().then_some(blob),
            published,
            streamed: false,
        });
    }
    index_here(cache, src, layer, place, opts).await
}

/// A layer `i` (from 0) with a TOC, read through it. `None` when the layer has no TOC, or
/// one that cannot be used (logged): it is then indexed whole. Wrong bytes for what the
/// manifest vouches for are refused.
async fn from_toc(
    cache: &Cache,
    src: &Source,
    layer: &Layer,
    i: usize,
) -> Result<Option<Obtained>> {
    let desc = &layer.descriptor;
    let Some((format, toc)) = toc_format(layer.compression, &desc.annotations) else {
        return Ok(None);
    };
    let opened = match toc {
        Ok(toc) => open_toc(format, cache, src, desc, &toc).await,
        Err(e) => Err(e),
    };
    match opened {
        Ok(t) => Ok(Some(Obtained {
            index: t.index,
            toc: Some(TocFiles::new(format, t.chunks, t.prefetch)),
            blob: None,
            published: false,
            streamed: false,
        })),
        Err(e @ Error::DigestMismatch { .. }) => Err(in_layer(e, i, &desc.digest)),
        Err(e) => {
            tracing::warn!(
                "layer {} ({}): not read as {} ({e}); indexing it whole",
                i + 1,
                desc.digest,
                format.name()
            );
            Ok(None)
        }
    }
}

/// Index the layer here, from its blob (see [`stream_and_index`]), telling the progress
/// sink, and cache the index.
async fn index_here(
    cache: &Cache,
    src: &Source,
    layer: &Layer,
    place: (usize, usize),
    opts: &Options,
) -> Result<Obtained> {
    let (i, n) = place;
    let digest = &layer.descriptor.digest;
    let started = std::time::Instant::now();
    let tell = |p: IndexProgress| {
        if let Some(sink) = &opts.progress {
            (sink.0)(&p);
        }
    };
    tell(IndexProgress::Indexing {
        layer: i + 1,
        of: n,
        digest: digest.clone(),
        bytes: layer.descriptor.size,
    });
    let last_told = std::sync::Mutex::new(started);
    let streamed = |done: u64| {
        let mut last = last_told.lock().unwrap();
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            *last = std::time::Instant::now();
            tell(IndexProgress::Streamed {
                layer: i + 1,
                of: n,
                done,
                bytes: layer.descriptor.size,
            });
        }
    };
    let (index, blob) = stream_and_index(cache, src, layer, opts, &streamed)
        .await
        .map_err(|e| in_layer(e, i, digest))?;
    tell(IndexProgress::Indexed {
        layer: i + 1,
        of: n,
        entries: index.entries.len(),
        elapsed: started.elapsed(),
    });
    if let Err(e) = cache.store_index(digest, &index) {
        tracing::warn!("not caching the index of {digest}: {e}");
    }
    Ok(Obtained {
        index,
        toc: None,
        blob,
        published: false,
        streamed: true,
    })
}

/// A malformed-layer error named by the layer it is in (`i`, from 0, with `digest`): the
/// parsers see only bytes.
fn in_layer(e: Error, i: usize, digest: &Digest) -> Error {
    match e {
        Error::Malformed { what, reason } => Error::Malformed {
            what: format!("{what} in layer {} ({digest})", i + 1),
            reason,
        },
        other => other,
    }
}

/// The cached index of layer `digest` that can serve reads (one with seek points): one built
/// here, else (with `published`) one from an index artifact. Whether it is published comes
/// back too. Blocking: it reads and decodes the index.
pub fn cached(cache: &Cache, digest: &Digest, published: bool) -> Option<(LayerIndex, bool)> {
    let usable = |i: &LayerIndex| i.seek.is_some();
    if let Some(i) = cache.load_index(digest).filter(usable) {
        return Some((i, false));
    }
    if published {
        return cache
            .load_published_index(digest)
            .filter(usable)
            .map(|i| (i, true));
    }
    None
}

/// The cached index of layer `digest` for knowing its entries without reading its bytes
/// (`pull` plans what to write from it): one built here from the verified blob, with or
/// without seek points. Published indexes are never used for this, so that what `pull`
/// writes never rests on them.
pub fn cached_entries(cache: &Cache, digest: &Digest) -> Option<LayerIndex> {
    cache.load_index(digest)
}

/// Index the layer from its blob: the cached one, or streamed from the source and indexed as
/// it arrives (the index counts only if the blob verifies; the blob is kept with
/// `keep_blobs`).
async fn stream_and_index(
    cache: &Cache,
    src: &Source,
    layer: &Layer,
    opts: &Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(LayerIndex, Option<PathBuf>)> {
    let (compression, limits, span) = (layer.compression, opts.limits, opts.span);
    let digest = &layer.descriptor.digest;
    if cache.has_blob(digest) {
        let blob = cache.blob_path(digest);
        let f = std::fs::File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
        let idx = tokio::task::spawn_blocking(move || build_index(f, compression, limits, span))
            .await
            .map_err(Error::worker)??;
        return Ok((idx, Some(blob)));
    }
    let cut = opts
        .keep_spans
        .filter(|_| !opts.keep_blobs && !src.is_local());
    let keep = match (opts.keep_blobs, cut) {
        (true, _) => Keep::Named,
        (false, Some(_)) => Keep::Verified,
        (false, None) => Keep::No,
    };
    let (index, blob) = crate::fetch::consume(
        cache,
        src,
        &layer.descriptor,
        keep,
        progress,
        || move |r| build_index(r, compression, limits, span),
        async || Ok(()),
    )
    .await?;
    let (Some(bound), Some(blob)) = (cut, &blob) else {
        return Ok((index, blob));
    };
    // Stored meanwhile by another process: a named blob, read in place and left alone.
    if *blob == cache.blob_path(&layer.descriptor.digest) {
        return Ok((index, Some(blob.clone())));
    }
    let blob = blob.clone();
    let (cache, size) = (cache.clone(), layer.descriptor.size);
    tokio::task::spawn_blocking(move || {
        if let Some(sp) = &index.seek {
            keep_spans(&cache, &blob, sp, size, bound);
        }
        // A temporary file, verified but never named: only its spans are kept.
        if let Err(e) = std::fs::remove_file(&blob) {
            tracing::warn!("removing {}: {e}", blob.display());
        }
        (index, None)
    })
    .await
    .map_err(Error::worker)
}

/// Store the spans of verified blob `blob` in the chunk store, in order, while the store
/// holds less than `bound` bytes. Each is checked against its span digest like a fetched
/// one; a span that does not match (an index that does not fit the blob) is skipped.
fn keep_spans(cache: &Cache, blob: &Path, sp: &SeekPoints, size: u64, bound: u64) {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(blob) else {
        return;
    };
    let mut room = bound.saturating_sub(cache.chunk_usage());
    for (k, digest) in sp.span_digests.iter().enumerate() {
        let (a, b) = sp.span_range(k, size);
        let len = b.saturating_sub(a);
        if len > room {
            break;
        }
        let mut bytes = vec![0; len as usize];
        if f.read_exact_at(&mut bytes, a).is_err() || SpanDigest::of(&bytes) != *digest {
            continue;
        }
        if cache.has_chunk(digest) || cache.store_chunk(digest, &bytes).is_ok() {
            room -= len;
        }
    }
    // Layers indexed at the same time each saw the room as it was before them.
    if cache.chunk_usage() > bound {
        cache.trim_chunks(bound);
    }
}

/// Read a layer's TOC: the footer (one small range request), then the TOC from the chunk
/// store or by range, verified against the digest the layer's annotation gives.
async fn open_toc(
    format: &dyn TocFormat,
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    toc_digest: &Digest,
) -> Result<crate::layer::format::TocLayer> {
    let kind = format!("{} layer", format.name());
    let size = desc.size;
    let footer_len = format.footer_len();
    if desc.size_unknown || size < footer_len {
        return Err(Error::malformed(kind, "too small for a footer"));
    }
    let no_range = || Error::Unsupported {
        what: format!("source for {}", format.name()),
        value: format!("{} (it ignores Range)", src.name()),
    };
    let footer = if footer_len == 0 {
        bytes::Bytes::new()
    } else {
        src.read_range(desc, size - footer_len, size)
            .await?
            .ok_or_else(no_range)?
    };
    let range = format.toc_range(&footer, &desc.annotations, size)?;
    let covered = match cache.load_chunk(toc_digest) {
        Some(covered) => covered.to_vec(),
        None => {
            let stored = src
                .read_range(desc, range.start, range.end)
                .await?
                .ok_or_else(no_range)?;
            let covered = format.covered(&stored)?;
            let actual = Digest::of(&covered);
            if actual != *toc_digest {
                return Err(Error::DigestMismatch {
                    what: format!("{} TOC of layer {}", format.name(), desc.digest),
                    expected: toc_digest.clone(),
                    actual,
                });
            }
            if let Err(e) = cache.store_chunk(toc_digest, &covered) {
                tracing::warn!("not keeping the TOC of {}: {e}", desc.digest);
            }
            covered
        }
    };
    format.parse(&format.json(&covered)?, range.start)
}
