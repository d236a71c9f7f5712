//! The model behind `imgfs store`, a containers/storage Additional Layer Store (podman,
//! CRI-O): layers looked up as `<base64 of an image reference>/<layer digest>`, each served
//! alone in overlayfs form, with the layer record containers/storage reads (`info`), its
//! compressed blob (`blob`) and a use count. `fuse::store` serves it; this module resolves
//! references and layers, once each, and keeps the counts an operator reads to see what was
//! served and what was refused, and why. Once an image's layers are all open, the access
//! profile published with its indexes is replayed (`view::Reader::replay_profile`). Protocol and podman versions: docs/layer-store.md.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::OnceCell;

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Compression, Descriptor, Image};
use crate::source::Source;
use crate::view::{LayerView, Prefetch, Reader, ViewOptions};

/// How the store turns a reference into its source and image: the caller's (the cli's)
/// configuration of credentials, mirrors and platform.
pub type OpenImage =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<(Source, Image)>> + Send + Sync>;

/// The latest reasons a daemon gives for what it did not serve (the store's refusals, the
/// snapshotter's fallbacks), as its status file lists them.
#[derive(Default)]
pub struct Recent(Mutex<VecDeque<String>>);

impl Recent {
    /// Reasons remembered.
    const KEPT: usize = 20;

    pub fn push(&self, reason: String) {
        let mut recent = self.0.lock().unwrap();
        if recent.len() == Self::KEPT {
            recent.pop_front();
        }
        recent.push_back(reason);
    }

    /// One line per reason, oldest first, each after `label`.
    pub fn lines(&self, label: &str) -> String {
        let recent = self.0.lock().unwrap();
        recent.iter().map(|r| format!("{label}: {r}\n")).collect()
    }
}

pub struct Store {
    cache: Cache,
    reader: Arc<Reader>,
    opts: ViewOptions,
    open_image: OpenImage,
    images: Mutex<HashMap<String, Arc<OnceCell<Arc<Resolved>>>>>,
    layers: Mutex<HashMap<Digest, Arc<OnceCell<Arc<StoreLayer>>>>>,
    served: AtomicU64,
    refused: AtomicU64,
    recent: Recent,
}

/// A reference resolved to its image.
struct Resolved {
    src: Arc<Source>,
    image: Image,
    /// The uncompressed digest of each layer, from the config's `rootfs.diff_ids`.
    diff_ids: Vec<Option<Digest>>,
    /// Its published access profile was handed to the reader (or there was none).
    replayed: AtomicBool,
}

/// One layer as the store serves it.
pub struct StoreLayer {
    /// The layer's own tree in overlayfs form, and its bytes.
    pub view: LayerView,
    /// The containers/storage layer record (`info`).
    pub info: Vec<u8>,
    pub descriptor: Descriptor,
    src: Arc<Source>,
    /// Uses containers/storage announced (`use` created) and not yet released.
    pub uses: AtomicU64,
}

impl Store {
    pub fn new(cache: Cache, opts: ViewOptions, open_image: OpenImage) -> Store {
        Store {
            reader: Reader::new(&cache, &opts),
            cache,
            opts,
            open_image,
            images: Mutex::default(),
            layers: Mutex::default(),
            served: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            recent: Recent::default(),
        }
    }

    /// Layer `digest` of the image `reference` names, ready to serve. An error says why it
    /// cannot be (containers/storage then pulls the layer itself); it is counted and kept
    /// for the status file.
    pub async fn layer(&self, reference: &str, digest: &str) -> Result<Arc<StoreLayer>> {
        match self.find_layer(reference, digest).await {
            Ok(l) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                Ok(l)
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("not serving {digest} of {reference}: {e}");
                self.recent.push(format!("{reference} {digest}: {e}"));
                Err(e)
            }
        }
    }

    async fn find_layer(&self, reference: &str, digest: &str) -> Result<Arc<StoreLayer>> {
        let digest = Digest::parse(digest).map_err(|_| {
            Error::malformed("layer store path", format!("{digest:?} is not a digest"))
        })?;
        let mut image = self.image(reference, false).await?;
        let mut at = position(&image.image, &digest);
        if at.is_none() {
            // A tag may have moved since it was resolved.
            image = self.image(reference, true).await?;
            at = position(&image.image, &digest);
        }
        let Some(i) = at else {
            return Err(Error::Unsupported {
                what: format!("layer of {reference}"),
                value: format!("{digest} (not in the image)"),
            });
        };
        let cell = self
            .layers
            .lock()
            .unwrap()
            .entry(digest)
            .or_default()
            .clone();
        let layer = cell
            .get_or_try_init(|| self.open_layer(&image, i))
            .await
            .cloned()?;
        self.replay_when_open(&image);
        Ok(layer)
    }

    /// Once every layer of `image` is open, replay the access profile published with its
    /// indexes, once, in the background: a runtime asks for an image's layers one after
    /// another and then starts the container, whose reads then find local what the profile
    /// names. Not with `--prefetch none` (every byte fetched is then asked for by a read).
    fn replay_when_open(&self, image: &Resolved) {
        if !self.opts.remote_index
            || self.opts.prefetch == Prefetch::None
            || image.replayed.load(Ordering::Relaxed)
        {
            return;
        }
        let open: Option<Vec<_>> = {
            let layers = self.layers.lock().unwrap();
            image
                .image
                .layers
                .iter()
                .map(|l| {
                    let cell = layers.get(&l.descriptor.digest)?;
                    cell.get().map(|s| s.view.layer.clone())
                })
                .collect()
        };
        let Some(open) = open else { return };
        if image.replayed.swap(true, Ordering::Relaxed) {
            return;
        }
        let digest = &image.image.manifest_digest;
        let Some(bytes) = self.cache.load_published_profile(digest) else {
            return;
        };
        match crate::profile::Profile::parse(&bytes) {
            Ok(p) => {
                tracing::info!("access profile of {digest}: {} reads", p.reads.len());
                self.reader.replay_profile(p, open);
            }
            Err(e) => tracing::warn!("not using the access profile of {digest}: {e}"),
        }
    }

    /// The image `reference` names, resolved once (again with `fresh`).
    async fn image(&self, reference: &str, fresh: bool) -> Result<Arc<Resolved>> {
        let cell = {
            let mut images = self.images.lock().unwrap();
            if fresh {
                images.remove(reference);
            }
            images.entry(reference.to_string()).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            let (src, image) = (self.open_image)(reference.to_string()).await?;
            if self.opts.remote_index {
                let want_profile = self.opts.prefetch != Prefetch::None;
                let subject = &image.manifest_digest;
                crate::obtain::fetch_published(
                    &self.cache,
                    &src,
                    subject,
                    &image.layers,
                    want_profile,
                )
                .await;
            }
            let diff_ids = diff_ids(&image);
            Ok::<_, Error>(Arc::new(Resolved {
                src: Arc::new(src),
                image,
                diff_ids,
                replayed: AtomicBool::new(false),
            }))
        })
        .await
        .cloned()
    }

    async fn open_layer(&self, image: &Resolved, i: usize) -> Result<Arc<StoreLayer>> {
        let data = crate::view::open_layer(
            &self.reader,
            &self.cache,
            &image.src,
            &image.image,
            i,
            &self.opts,
        )
        .await?;
        let desc = image.image.layers[i].descriptor.clone();
        let info = layer_record(
            &desc,
            image.image.layers[i].compression,
            image.diff_ids[i].as_ref(),
        )?;
        let view = LayerView::overlay(data, self.reader.clone())?;
        // Obtaining an index may have streamed and decompressed the layer on several
        // threads; give the freed memory back, since a store lives long and opens many
        // layers (BENCHMARKS.md, "containerd through imgfs snapshotter").
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            // SAFETY: malloc_trim only returns free memory to the system.
            libc::malloc_trim(0);
        }
        Ok(Arc::new(StoreLayer {
            view,
            info,
            descriptor: desc,
            src: image.src.clone(),
            uses: AtomicU64::new(0),
        }))
    }

    /// The layer's verified compressed blob in the cache, fetched whole on first use (only
    /// `podman push` and `save` read it).
    pub async fn blob(&self, layer: &StoreLayer) -> Result<PathBuf> {
        crate::fetch::blob(&self.cache, &layer.src, &layer.descriptor).await
    }

    /// What an operator reads in the status file: counts, and the latest refusals with
    /// their reasons.
    pub fn status(&self) -> String {
        let s = format!(
            "served {}\nrefused {}\nlayers open {}\n",
            self.served.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.layers
                .lock()
                .unwrap()
                .values()
                .filter(|c| c.initialized())
                .count(),
        );
        s + &self.recent.lines("refused")
    }
}

/// Where layer `digest` is in `image`: by its blob digest (what podman 4.3 looks up) or, for
/// a layer with a TOC, by the TOC's digest (what podman 5.1 and later look up for eStargz and
/// zstd:chunked layers).
fn position(image: &Image, digest: &Digest) -> Option<usize> {
    image.layers.iter().position(|l| {
        l.descriptor.digest == *digest
            || crate::layer::format::toc_format(l.compression, &l.descriptor.annotations)
                .is_some_and(|(_, toc)| toc.is_ok_and(|t| t == *digest))
    })
}

/// Each layer's uncompressed digest, from the config's `rootfs.diff_ids` (None where the
/// config does not say).
fn diff_ids(image: &Image) -> Vec<Option<Digest>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: Option<RootFs>,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let listed = serde_json::from_slice::<Config>(&image.raw_config)
        .ok()
        .and_then(|c| c.rootfs)
        .map(|r| r.diff_ids)
        .unwrap_or_default();
    (0..image.layers.len())
        .map(|i| listed.get(i).and_then(|d| Digest::parse(d).ok()))
        .collect()
}

/// The containers/storage layer record for `info`: what its `Layer` struct reads
/// (`compressed-diff-digest`, `compressed-size`, `diff-digest`, `diff-size`, `compression`).
/// The uncompressed digest is required: containers/storage names the layer by it. The
/// uncompressed size is not known without reading the whole layer: 0, as stargz-store
/// gives.
fn layer_record(
    desc: &Descriptor,
    compression: Compression,
    diff_id: Option<&Digest>,
) -> Result<Vec<u8>> {
    let Some(diff_id) = diff_id else {
        return Err(Error::malformed(
            "image config",
            "no rootfs.diff_ids entry for the layer",
        ));
    };
    // containers/storage's archive.Compression: 0 none, 2 gzip, 4 zstd.
    let kind = match compression {
        Compression::None => 0,
        Compression::Gzip => 2,
        Compression::Zstd => 4,
    };
    let record = serde_json::json!({
        "compressed-diff-digest": desc.digest.to_string(),
        "compressed-size": desc.size,
        "diff-digest": diff_id.to_string(),
        "diff-size": 0,
        "compression": kind,
    });
    Ok(serde_json::to_vec(&record).expect("a JSON value serialises"))
}
