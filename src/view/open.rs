//! Opening a view: each layer's index obtained (`crate::obtain`: the cache, a published index
//! artifact, a TOC (eStargz, zstd:chunked), or streaming the layer once), then the layers merged into one
//! tree.

use std::fs::File;
use std::sync::Arc;

use futures_util::{StreamExt, TryFutureExt, TryStreamExt};

use super::{ImageView, LayerData, Reader, ViewOptions};
use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::index::LayerIndex;
use crate::manifest::Image;
use crate::source::Source;
use crate::tree::{self};

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
            crate::obtain::fetch_published(cache, &src, image, &image.layers[..n]).await;
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

/// Layer `i` of `image` as `reader` holds it, or obtained (`crate::obtain`) and then held,
/// for serving that layer alone ([`super::LayerView`]).
pub async fn open_layer(
    reader: &Arc<Reader>,
    cache: &Cache,
    src: &Arc<Source>,
    image: &Image,
    i: usize,
    opts: &ViewOptions,
) -> Result<Arc<LayerData>> {
    let layer = &image.layers[i];
    if let Some(open) = reader.open_layer(&layer.descriptor.digest) {
        return Ok(open);
    }
    let (data, _) = obtain_layer(cache, src, layer, i, image.layers.len(), opts).await?;
    reader.remember_layer(&data);
    Ok(data)
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

/// A layer's index, obtained the one way every command does (`crate::obtain`), as the
/// view's `LayerData`, with its local blob open. Whether it was a published one comes back
/// too: if published indexes do not merge, the view is opened again without them.
async fn obtain_layer(
    cache: &Cache,
    src: &Arc<Source>,
    layer: &crate::manifest::Layer,
    i: usize,
    n: usize,
    opts: &ViewOptions,
) -> Result<(Arc<LayerData>, bool)> {
    let got = crate::obtain::layer_index(cache, src, layer, (i, n), &opts.obtain()).await?;
    let data = LayerData::new(layer, src.clone(), got.index, got.toc);
    if let Some(blob) = got.blob {
        let f = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
        // Marks it used, for pruning oldest first.
        let _ = f.set_modified(std::time::SystemTime::now());
        let _ = data.local.set(f);
    }
    Ok((data, got.published))
}
