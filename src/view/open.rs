//! Opening a view: each layer's index obtained — the cache, a published index artifact, an
//! eStargz TOC, or streaming the layer once — then the layers merged into one tree.

use std::fs::File;
use std::sync::Arc;

use futures_util::{StreamExt, TryFutureExt, TryStreamExt};

use super::fetcher::open_stargz;
use super::layer::{Stargz, build_index};
use super::{ImageView, IndexProgress, LayerData, Reader, ViewOptions};
use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::index::LayerIndex;
use crate::layer::estargz::{self};
use crate::manifest::{Compression, Image};
use crate::source::Source;
use crate::tree::{self};

/// How long looking for published layer indexes may take before layers are indexed here.
pub(super) const REMOTE_INDEX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

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
        Self::open_in(&Reader::new(cache, opts), cache, src, image, opts).await
    }

    /// [`ImageView::open`] through a shared `reader`: layers already open through it are
    /// used as they are (their indexes are not loaded again), and reads share its fetcher
    /// and piece cache.
    pub async fn open_in(
        reader: &Arc<Reader>,
        cache: &Cache,
        src: Arc<Source>,
        image: &Image,
        opts: &ViewOptions,
    ) -> Result<ImageView> {
        match Self::open_once(reader, cache, src.clone(), image, opts).await? {
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
                Self::open_once(reader, cache, src, image, &opts)
                    .await?
                    .map_err(|(e, _)| e)
            }
        }
    }

    /// [`ImageView::open`], except that a merge failure with published indexes in use is
    /// returned apart, with the layers they describe, for the caller to retry without them.
    async fn open_once(
        reader: &Arc<Reader>,
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
                    obtain_shared(reader, cache, src_ref, layer, i, n, opts)
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
            reader: reader.clone(),
        }))
    }
}

/// [`obtain_layer`], or the layer as `reader` already holds it. Layers from published
/// indexes are not shared: if they do not merge, the view is opened again without them.
async fn obtain_shared(
    reader: &Arc<Reader>,
    cache: &Cache,
    src: &Arc<Source>,
    layer: &crate::manifest::Layer,
    i: usize,
    n: usize,
    opts: &ViewOptions,
) -> Result<(Arc<LayerData>, bool)> {
    if let Some(open) = reader.open_layer(&layer.descriptor.digest) {
        return Ok((open, false));
    }
    let (data, published) = obtain_layer(cache, src, layer, i, n, opts).await?;
    if !published {
        reader.remember_layer(&data);
    }
    Ok((data, published))
}

/// A layer's index, obtained the one way every view does: from the cache (rebuilt if it has
/// no seek points), else a published index (`artifact` fetched it beforehand), else an
/// eStargz TOC, else by streaming the layer once (its blob kept only with `keep_blobs`).
/// Whether it was a published one comes back too: if published indexes do not merge, the
/// view is opened again without them.
async fn obtain_layer(
    cache: &Cache,
    src_ref: &Arc<Source>,
    layer: &crate::manifest::Layer,
    i: usize,
    n: usize,
    opts: &ViewOptions,
) -> Result<(Arc<LayerData>, bool)> {
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
                return Ok((
                    LayerData::new(layer, src_ref.clone(), sg.index, Some(files)),
                    false,
                ));
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
        .map_err(Error::worker)?
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
            let idx = tokio::task::spawn_blocking(move || build_index(f, compression, limits))
                .await
                .map_err(Error::worker)?
                .map_err(name)?;
            (Some(blob), idx)
        }
        None => {
            // Index while downloading; the index counts only if the blob verifies.
            let (idx, blob) = crate::fetch::consume(
                cache,
                src_ref,
                &layer.descriptor,
                opts.keep_blobs,
                &|_| {},
                || move |r| build_index(r, compression, limits),
                async || Ok(()),
            )
            .await
            .map_err(name)?;
            (blob, idx)
        }
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
    let data = LayerData::new(layer, src_ref.clone(), index, None);
    if let Some(blob) = blob {
        let f = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
        // Marks it used, for pruning oldest first.
        let _ = f.set_modified(std::time::SystemTime::now());
        let _ = data.local.set(f);
    }
    Ok((data, published))
}
