//! An image as a readable tree, without extracting it: the merged [`Tree`] plus, for every
//! regular file, a way to read any byte range straight out of its layer blob. `mount` serves
//! it over FUSE; `ls` and `cat` answer from it directly.
//!
//! Reads go through seek points: an uncompressed layer is read in place; a gzip or zstd layer
//! is decompressed from the seek point before the range (a deflate block boundary, or a zstd
//! frame start), one span at a time, and recent spans are kept in a bounded LRU so that
//! sequential and repeated reads decompress each span once. A single-frame zstd layer has
//! one seek point, so its spans cost a decompression from its start.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{StreamExt, TryStreamExt};

use crate::cache::Cache;
use crate::error::{Error, IoContext, Result};
use crate::index::{self, LayerIndex};
use crate::layer::seek;
use crate::manifest::{Compression, Image};
use crate::source::Source;
use crate::tree::{self, InodeId, Tree};

/// One layer's blob and index.
pub struct LayerData {
    pub digest: String,
    pub blob: PathBuf,
    /// The blob, open for the life of the view: reads of uncompressed layers are `pread`s on
    /// it (safe to share between threads; seeking readers open their own).
    file: File,
    pub compression: Compression,
    pub index: LayerIndex,
}

/// Options for [`ImageView::open`].
#[derive(Clone, Debug)]
pub struct ViewOptions {
    /// Only the first N layers (the image as of its N-th layer).
    pub layers: Option<usize>,
    /// Layers fetched and indexed at once.
    pub jobs: usize,
    /// Decompressed spans kept in memory.
    pub cached_spans: usize,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            layers: None,
            jobs: 4,
            cached_spans: 6,
        }
    }
}

type SpanKey = (u32, u64);

pub struct ImageView {
    pub tree: Tree,
    pub layers: Vec<LayerData>,
    spans: Mutex<lru::LruCache<SpanKey, Arc<Vec<u8>>>>,
    /// One gate per span being decompressed: readahead sends several reads into one cold
    /// span at once, and only the first should decompress it (CPU, and memory).
    inflight: Mutex<std::collections::HashMap<SpanKey, Arc<Mutex<()>>>>,
}

/// Index a layer blob read from `blob`: entries, and seek points for gzip.
fn build_index(
    blob: impl std::io::Read + Send + 'static,
    compression: Compression,
) -> Result<LayerIndex> {
    match compression {
        Compression::Gzip => {
            let mut r =
                seek::IndexingReader::new(std::io::BufReader::with_capacity(256 << 10, blob))
                    .ctx(|| "starting to decompress".into())?;
            let mut idx = index::build(&mut r, |_, _, _| Ok(()))?;
            // Drain what follows the tar's end marker so that the checks at the end run and
            // the last span digest covers the blob to its end.
            std::io::copy(&mut r, &mut std::io::sink())
                .map_err(|e| Error::malformed("layer", e))?;
            idx.seek = Some(r.seek_points());
            Ok(idx)
        }
        Compression::Zstd => {
            let mut r = crate::layer::zstd_seek::ZstdIndexingReader::new(
                std::io::BufReader::with_capacity(256 << 10, blob),
            );
            let mut idx = index::build(&mut r, |_, _, _| Ok(()))?;
            std::io::copy(&mut r, &mut std::io::sink())
                .map_err(|e| Error::malformed("layer", e))?;
            idx.seek = Some(r.seek_points());
            Ok(idx)
        }
        Compression::None => index::build(blob, |_, _, _| Ok(())),
    }
}

impl ImageView {
    /// Fetch every layer blob (verified) and index it — or load its index from the cache —
    /// then merge. Indexes are built concurrently and cached for the next time.
    pub async fn open(
        cache: &Cache,
        src: &Source,
        image: &Image,
        opts: &ViewOptions,
    ) -> Result<ImageView> {
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
        let layers: Vec<LayerData> =
            futures_util::stream::iter(image.layers[..n].iter().enumerate())
                .map(|(i, layer)| async move {
                    let digest = &layer.descriptor.digest;
                    let compression = layer.compression;
                    let name = move |e: Error| match e {
                        Error::Malformed { what, reason } => Error::Malformed {
                            what: format!(
                                "{what} in layer {} ({})",
                                i + 1,
                                layer.descriptor.digest
                            ),
                            reason,
                        },
                        other => other,
                    };
                    let joined = |e: tokio::task::JoinError| Error::Io {
                        context: "an indexing thread failed".into(),
                        cause: std::io::Error::other(e.to_string()),
                    };
                    let cached = cache
                        .load_index(digest)
                        .filter(|idx| compression == Compression::None || idx.seek.is_some());
                    let fresh = cached.is_none();
                    let (blob, index) = match cached {
                        Some(idx) => (cache.fetch(src, &layer.descriptor).await?, idx),
                        None if cache.has_blob(digest) => {
                            let blob = cache.blob_path(digest);
                            let f =
                                File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
                            let idx =
                                tokio::task::spawn_blocking(move || build_index(f, compression))
                                    .await
                                    .map_err(joined)?
                                    .map_err(name)?;
                            (blob, idx)
                        }
                        None => {
                            // Index while downloading; the index counts only if the blob verifies.
                            let (tx, rx) = tokio::sync::mpsc::channel(8);
                            let indexing = tokio::task::spawn_blocking(move || {
                                build_index(crate::layer::ChannelReader::new(rx), compression)
                            });
                            let fetched = cache
                                .fetch_into(src, &layer.descriptor, &|_| {}, Some(&tx))
                                .await;
                            drop(tx);
                            let idx = indexing.await.map_err(joined)?;
                            let blob = fetched?;
                            (blob, idx.map_err(name)?)
                        }
                    };
                    if fresh && let Err(e) = cache.store_index(digest, &index) {
                        tracing::warn!("not caching the index of {digest}: {e}");
                    }
                    let file = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
                    Ok::<_, Error>(LayerData {
                        digest: digest.to_string(),
                        blob,
                        file,
                        compression,
                        index,
                    })
                })
                .buffered(opts.jobs.max(1))
                .try_collect()
                .await?;
        let names: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let refs: Vec<&LayerIndex> = layers.iter().map(|l| &l.index).collect();
        let t = std::time::Instant::now();
        let tree = tree::merge(&refs, &names)?;
        tracing::debug!("tree merged in {:.1?}", t.elapsed());
        Ok(ImageView {
            tree,
            layers,
            spans: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(opts.cached_spans.max(1)).expect("at least one"),
            )),
            inflight: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Read up to `len` bytes at `offset` of regular file `inode`. Short only at its end.
    pub fn read(&self, inode: InodeId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let ino = &self.tree.inodes[inode as usize];
        let Some(data) = ino.data else {
            return Err(Error::malformed("read", "not a regular file"));
        };
        let layer = &self.layers[data.layer as usize];
        let entry = &layer.index.entries[data.entry as usize];
        if offset >= entry.size {
            return Ok(Vec::new());
        }
        let len = len.min((entry.size - offset) as usize);
        let start = entry.offset + offset;
        let fail = |e: std::io::Error| Error::Io {
            context: format!("reading {} from layer {}", entry.path, layer.digest),
            cause: e,
        };
        match layer.compression {
            Compression::None => {
                let mut buf = vec![0u8; len];
                layer.file.read_exact_at(&mut buf, start).map_err(fail)?;
                Ok(buf)
            }
            Compression::Gzip | Compression::Zstd => {
                self.read_spans(data.layer, layer, start, len).map_err(fail)
            }
        }
    }

    fn span(
        &self,
        key: SpanKey,
        make: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<Arc<Vec<u8>>> {
        if let Some(s) = self.spans.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        // Decompress outside the cache lock, so that readers of other spans go on; readers
        // of this span wait at its gate and then find it cached.
        let gate = self
            .inflight
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .clone();
        let _turn = gate.lock().unwrap();
        if let Some(s) = self.spans.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        let made = make().map(Arc::new);
        if let Ok(s) = &made {
            // Cached before the gate goes, so a newcomer finds it rather than a new gate.
            self.spans.lock().unwrap().put(key, s.clone());
        }
        self.inflight.lock().unwrap().remove(&key);
        made
    }

    fn read_spans(
        &self,
        li: u32,
        layer: &LayerData,
        start: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let cps = layer
            .index
            .seek
            .as_ref()
            .map(|s| s.checkpoints.as_slice())
            .ok_or_else(|| std::io::Error::other("layer indexed without seek points"))?;
        let mut out = Vec::with_capacity(len);
        let mut pos = start;
        while out.len() < len {
            let k = cps
                .partition_point(|c| c.out_offset <= pos)
                .checked_sub(1)
                .ok_or_else(|| {
                    std::io::Error::other("no seek point before the requested offset")
                })?;
            // Cached spans are at most SPAN bytes, aligned from their seek point, however
            // far apart seek points are (a single-frame zstd layer has only one).
            let cp_start = cps[k].out_offset;
            let span_start = cp_start + (pos - cp_start) / seek::SPAN * seek::SPAN;
            let span_len = match cps.get(k + 1) {
                Some(next) => (next.out_offset - span_start).min(seek::SPAN) as usize,
                None => seek::SPAN as usize,
            };
            let span = self.span((li, span_start), || {
                let mut f = File::open(&layer.blob)?;
                let len = span_len;
                match layer.compression {
                    Compression::Zstd => {
                        crate::layer::zstd_seek::read_at(&mut f, cps, span_start, len)
                    }
                    _ => seek::read_at(&mut f, cps, span_start, len),
                }
            })?;
            let at = (pos - span_start) as usize;
            if at >= span.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "layer ends before the file does",
                ));
            }
            let take = (len - out.len()).min(span.len() - at);
            out.extend_from_slice(&span[at..at + take]);
            pos += take as u64;
        }
        Ok(out)
    }
}
