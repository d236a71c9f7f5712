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
use crate::manifest::{Image, Layer, Platform};
use crate::obtain::{Fetched, fetch_published, wants_published_index};
use crate::source::Source;
use crate::tree::{self};

impl ImageView {
    /// Resolve `src` (for `platform`) and open its view, the published indexes looked for
    /// while the image's config is fetched (a round trip less than after it).
    pub async fn resolve_and_open(
        cache: &Cache,
        src: Arc<Source>,
        platform: Option<&Platform>,
        opts: &ViewOptions,
    ) -> Result<(Image, ImageView)> {
        let mut fetched = None;
        let image = crate::fetch::resolve_alongside(cache, &src, platform, async |m| {
            let layers: Option<Vec<Layer>> = m.layers.iter().map(Layer::from_manifest).collect();
            // Without them, resolving fails on the layer imgfs cannot read. Layers that
            // need no index (TOCs, cached) are opened beside the profile's lookup instead.
            if let Some(layers) = layers.filter(|_| opts.remote_index)
                && let n = opts.layers.unwrap_or(layers.len()).min(layers.len())
                && wants_published_index(cache, &layers[..n])
            {
                let want = opts.want_profile;
                fetched = Some(fetch_published(cache, &src, m.digest, &layers[..n], want).await);
            }
        })
        .await?;
        let reader = Reader::new(cache, opts);
        let view = Self::open_fetched(&reader, cache, src, &image, opts, fetched).await?;
        Ok((image, view))
    }

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
        Self::open_fetched(reader, cache, src, image, opts, None).await
    }

    /// [`ImageView::open_in`], with what looking for published indexes found when they
    /// were looked for already (`None`: they are looked for first).
    async fn open_fetched(
        reader: &Arc<Reader>,
        cache: &Cache,
        src: Arc<Source>,
        image: &Image,
        opts: &ViewOptions,
        fetched: Option<Fetched>,
    ) -> Result<ImageView> {
        match Self::open_once(reader, cache, src.clone(), image, opts, fetched).await? {
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
                Self::open_once(reader, cache, src, image, &opts, None)
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
        fetched: Option<Fetched>,
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
        let (subject, wanted) = (&image.manifest_digest, &image.layers[..n]);
        let mut profile_lookup = None;
        let mut fetched = match fetched {
            Some(f) => f,
            None if opts.remote_index && wants_published_index(cache, wanted) => {
                fetch_published(cache, &src, subject, wanted, opts.want_profile).await
            }
            None => {
                if opts.remote_index && opts.want_profile {
                    profile_lookup = Some(fetch_published(cache, &src, subject, wanted, true));
                }
                Fetched::new()
            }
        };
        let src_ref = &src;
        // Largest first: the biggest layer's decompression is usually what the mount waits
        // for, so it must not queue behind small ones when there are more layers than jobs.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(image.layers[i].descriptor.size));
        let jobs: Vec<_> = order
            .into_iter()
            .map(|i| {
                let layer = &image.layers[i];
                (i, layer, fetched.remove(&layer.descriptor.digest))
            })
            .collect();
        let opening = futures_util::stream::iter(jobs)
            .map(|(i, layer, fetched)| {
                obtain_shared(reader, cache, src_ref, layer, (i, n), opts, fetched)
                    // Tagged with its place, since layers finish in any order.
                    .map_ok(move |r| (i, r))
            })
            .buffer_unordered(opts.jobs.max(1))
            .try_collect::<Vec<_>>();
        let lookup = async {
            if let Some(l) = profile_lookup {
                l.await;
            }
        };
        let (layers, ()) = futures_util::join!(opening, lookup);
        let mut layers: Vec<(usize, (Arc<LayerData>, bool))> = layers?;
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
    let place = (i, image.layers.len());
    let (data, _) = obtain_layer(reader, cache, src, layer, place, opts, None).await?;
    reader.remember_layer(&data);
    Ok(data)
}

/// [`obtain_layer`], or the layer as `reader` already holds it. Layers from published
/// indexes are not shared: if they do not merge, the view is opened again without them.
async fn obtain_shared(
    reader: &Arc<Reader>,
    cache: &Cache,
    src: &Arc<Source>,
    layer: &Layer,
    place: (usize, usize),
    opts: &ViewOptions,
    fetched: Option<LayerIndex>,
) -> Result<(Arc<LayerData>, bool)> {
    if let Some(open) = reader.open_layer(&layer.descriptor.digest) {
        return Ok((open, false));
    }
    let (data, published) = obtain_layer(reader, cache, src, layer, place, opts, fetched).await?;
    if !published {
        reader.remember_layer(&data);
    }
    Ok((data, published))
}

/// A layer's index, obtained the one way every command does (`crate::obtain`), as the
/// view's `LayerData`, with its local blob open. Whether it was a published one comes back
/// too: if published indexes do not merge, the view is opened again without them.
/// `fetched`: its published index, just fetched and decoded.
async fn obtain_layer(
    reader: &Reader,
    cache: &Cache,
    src: &Arc<Source>,
    layer: &Layer,
    place: (usize, usize),
    opts: &ViewOptions,
    fetched: Option<LayerIndex>,
) -> Result<(Arc<LayerData>, bool)> {
    let got = crate::obtain::layer_index(cache, src, layer, place, &opts.obtain(), fetched).await?;
    if got.streamed {
        reader.recount_chunks();
    }
    let data = LayerData::new(layer, src.clone(), got.index, got.toc);
    if let Some(blob) = got.blob {
        let f = File::open(&blob).ctx(|| format!("opening {}", blob.display()))?;
        // Marks it used, for pruning oldest first.
        let _ = f.set_modified(std::time::SystemTime::now());
        let _ = data.local.set(f);
    }
    Ok((data, got.published))
}
