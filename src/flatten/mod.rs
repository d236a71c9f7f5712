//! Writing an image's merged tree out, to a directory (`imgfs pull IMAGE DIR`) or as one tar
//! stream (`--tar`).
//!
//! How it is fast: every layer is fetched and extracted at once (bounded by `jobs`), each into
//! its own flat staging directory — regular files only, named by their index position, with
//! their metadata already set. Nothing there depends on other layers, so layers download,
//! decompress and write in parallel on all cores. The layer indexes gathered on the way are
//! merged by `tree` (pure), and the result is materialised by `rename(2)`: a file's bytes are
//! written once, where they were extracted. Staging files that a later layer deleted or
//! replaced are simply left behind and removed with the staging area.
//!
//! How it is safe: staging names are numbers, and final paths come from the tree, whose
//! components are plain names under directories this run created in a fresh build directory;
//! no path is ever resolved through something a layer planted. The build directory sits next
//! to DIR and is renamed into place only on success; on failure it is removed.

mod apply;
mod git;
mod tar_out;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::index::{self, LayerIndex};
use crate::manifest::{Image, Layer};
use crate::source::Source;
use crate::tree;

pub use apply::Warnings;

/// Where `pull` writes.
pub enum Output {
    /// A new or empty directory.
    Dir(PathBuf),
    /// A tar stream to this writer.
    Tar(Box<dyn std::io::Write + Send>),
    /// A new or empty directory that becomes a git repository with one commit per layer.
    Git(PathBuf),
}

#[derive(Clone)]
pub struct PullOptions {
    /// Layers fetched and extracted at once.
    pub jobs: usize,
    /// Told what the pull is doing, layer by layer (the cli draws bars from it).
    pub progress: Option<Arc<dyn PullProgress>>,
    /// Limits on each layer's uncompressed stream.
    pub limits: index::Limits,
    /// Cancelled, the pull stops, removes what it built and fails with
    /// [`Error::Interrupted`].
    pub cancel: tokio_util::sync::CancellationToken,
}

/// What a pull tells its caller as it goes. Layers are numbered from 0, in image order.
pub trait PullProgress: Send + Sync {
    /// Before anything is fetched: every layer's digest and compressed size.
    fn start(&self, layers: &[(Digest, u64)]);
    /// Compressed bytes of layer `layer` received so far.
    fn bytes(&self, layer: usize, received: u64);
    /// What layer `layer` is doing now ("extracting", "again, from the registry", "done").
    fn state(&self, layer: usize, state: &str);
    /// All layers are in.
    fn finish(&self);
}

/// What a pull did, for the closing summary.
#[derive(Debug, Default)]
pub struct PullReport {
    pub entries: usize,
    pub warnings: Vec<String>,
}

/// Build directories are named `<prefix><pid>-<random>`, and the pull that made one holds an
/// exclusive `flock` on it for as long as it runs: the kernel drops the lock when the process
/// dies, however it dies, in whatever pid namespace or container it ran.
const BUILD_PREFIX: &str = ".imgfs-pull-";

/// Lock a fresh build directory for the life of the returned handle.
fn lock_build(dir: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(dir).ctx(|| format!("opening {}", dir.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)
        .ctx(|| format!("locking {}", dir.display()))?;
    Ok(f)
}

/// Remove build directories in `parent` that a killed pull left: named like ours, real
/// directories (not links) owned by us, and not locked by a running pull.
fn remove_abandoned_builds(parent: &Path) {
    let me = rustix::process::geteuid().as_raw();
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let name = e.file_name();
        let ours = name
            .to_str()
            .and_then(|n| n.strip_prefix(BUILD_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(pid, _)| pid.parse::<u32>().is_ok());
        let path = e.path();
        let Ok(md) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        if !ours || !md.is_dir() || md.uid() != me {
            continue;
        }
        // A lock we can take means no pull holds it: that pull is gone.
        let Ok(_lock) = lock_build(&path) else {
            continue;
        };
        if me != 0 {
            git::make_writable(&path);
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!("removed {}, left by a pull that was killed", path.display()),
            Err(e) => tracing::warn!(
                "cannot remove {} (left by a killed pull): {e}",
                path.display()
            ),
        }
    }
}

/// Flatten `image` (from `src`, blobs via `cache`) to `out`.
pub async fn pull(
    cache: &Cache,
    src: &Source,
    image: &Image,
    out: Output,
    opts: &PullOptions,
) -> Result<PullReport> {
    let build_parent = match &out {
        Output::Dir(dir) | Output::Git(dir) => check_target(dir)?,
        Output::Tar(_) => cache.root().join("tmp"),
    };
    remove_abandoned_builds(&build_parent);
    let build = tempfile::Builder::new()
        .prefix(&format!("{BUILD_PREFIX}{}-", std::process::id()))
        .tempdir_in(&build_parent)
        .ctx(|| format!("creating a build directory in {}", build_parent.display()))?;
    let _build_lock = lock_build(build.path())?;
    let warnings = Warnings::new();
    apply::init();
    let started = std::time::Instant::now();
    // Cancelled, the work is dropped where it waits: downloads stop at once, and threads
    // extracting or writing stop at their next buffer (they check the token).
    let result = tokio::select! {
        r = pull_in(
            cache,
            src,
            image,
            out,
            opts,
            build.path(),
            &warnings,
            started,
        ) => r,
        () = opts.cancel.cancelled() => Err(Error::Interrupted),
    };
    let interrupted = matches!(result, Err(Error::Interrupted));
    // Leftover staging files (deleted or replaced by later layers) go with the build dir.
    let build = build.keep();
    tokio::task::spawn_blocking(move || remove_build(&build, interrupted))
        .await
        .map_err(Error::worker)?;
    tracing::info!("staging removed: {:.2?}", started.elapsed());
    Ok(PullReport {
        entries: result?,
        warnings: warnings.take(),
    })
}

/// Remove a build directory. After an interruption, a worker thread may still be finishing
/// its current buffer there: removal is tried again until it stops.
fn remove_build(build: &Path, interrupted: bool) {
    for _ in 0..if interrupted { 50 } else { 1 } {
        if !rustix::process::geteuid().is_root() {
            // Without root, directories an image made read-only would keep their contents.
            git::make_writable(build);
        }
        match std::fs::remove_dir_all(build) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) if interrupted => std::thread::sleep(std::time::Duration::from_millis(100)),
            Err(e) => return tracing::warn!("cannot remove {}: {e}", build.display()),
        }
    }
    tracing::warn!("cannot remove {}", build.display());
}

/// The work of [`pull`] inside its build directory; returns the number of entries written.
#[allow(clippy::too_many_arguments)]
async fn pull_in(
    cache: &Cache,
    src: &Source,
    image: &Image,
    out: Output,
    opts: &PullOptions,
    build: &Path,
    warnings: &Warnings,
    started: std::time::Instant,
) -> Result<usize> {
    // Every commit of --git needs the files of its own tree, so nothing may be skipped there.
    let skip_shadowed = !matches!(out, Output::Git(_));
    // A tar stream takes metadata from the tree; staging files then stay readable by us
    // whatever their mode in the image (a 0000 /etc/shadow, when not root).
    let staging_meta = !matches!(out, Output::Tar(_));
    let plan = Staging {
        skip_shadowed,
        with_meta: staging_meta,
    };
    let (indexes, staging) = extract_all(cache, src, image, build, opts, plan, warnings).await?;
    let names: Vec<String> = image
        .layers
        .iter()
        .map(|l| l.descriptor.digest.to_string())
        .collect();
    tracing::info!("layers fetched and extracted: {:.2?}", started.elapsed());
    let tree = {
        let refs: Vec<&LayerIndex> = indexes.iter().collect();
        tree::merge(&refs, &names)?
    };
    tracing::info!("tree merged: {:.2?}", started.elapsed());
    let entries = tree.walk().len();
    let rootfs = build.join("rootfs");
    match out {
        Output::Dir(dir) => {
            let w = warnings.clone();
            let r = rootfs.clone();
            tokio::task::spawn_blocking(move || apply::materialize(&tree, &staging, &r, &w))
                .await
                .map_err(Error::worker)??;
            move_into_place(&rootfs, &dir)?;
        }
        Output::Git(dir) => {
            let w = warnings.clone();
            let r = rootfs.clone();
            tokio::task::spawn_blocking(move || {
                git::commit_layers(&indexes, &names, &staging, &tree, &r, &w)
            })
            .await
            .map_err(Error::worker)??;
            move_into_place(&rootfs, &dir)?;
        }
        Output::Tar(w) => {
            tokio::task::spawn_blocking(move || tar_out::write(&tree, &staging, w))
                .await
                .map_err(Error::worker)??;
        }
    }
    tracing::info!("tree written: {:.2?}", started.elapsed());
    Ok(entries)
}

/// Rename the finished `rootfs` to `dir` (replacing it if it is an empty directory).
fn move_into_place(rootfs: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        // Checked empty before we started; a racing writer makes this fail, which is right.
        std::fs::remove_dir(dir).ctx(|| format!("replacing empty {}", dir.display()))?;
    }
    std::fs::rename(rootfs, dir).ctx(|| format!("moving the finished tree to {}", dir.display()))
}

/// DIR must be new or an empty directory; returns the directory to build next to it in.
fn check_target(dir: &Path) -> Result<PathBuf> {
    if let Ok(mut rd) = std::fs::read_dir(dir) {
        if rd.next().is_some() {
            return Err(Error::Unsupported {
                what: "target directory (it must be new or empty)".into(),
                value: dir.display().to_string(),
            });
        }
    } else if dir.symlink_metadata().is_ok() {
        return Err(Error::Unsupported {
            what: "target (it exists and is not a directory)".into(),
            value: dir.display().to_string(),
        });
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::NotFound {
            what: "directory".into(),
            detail: format!("{} (the parent of {})", parent.display(), dir.display()),
        });
    }
    Ok(parent)
}

/// How staging is written.
#[derive(Clone, Copy)]
struct Staging {
    /// Leave out files the final tree does not keep (when all indexes are cached).
    skip_shadowed: bool,
    /// Give staging files their owner, mode, xattrs and mtime (not for a tar stream).
    with_meta: bool,
}

/// Fetch and extract every layer into `build/staging/<position>`; returns the layer indexes
/// and the staging directories, by position.
async fn extract_all(
    cache: &Cache,
    src: &Source,
    image: &Image,
    build: &Path,
    opts: &PullOptions,
    plan: Staging,
    warnings: &Warnings,
) -> Result<(Vec<LayerIndex>, Vec<PathBuf>)> {
    let Staging {
        skip_shadowed,
        with_meta,
    } = plan;
    let staging_root = build.join("staging");
    std::fs::create_dir(&staging_root).ctx(|| format!("creating {}", staging_root.display()))?;
    let staging: Vec<PathBuf> = (0..image.layers.len())
        .map(|i| staging_root.join(i.to_string()))
        .collect();
    let work = LayerWork {
        cache,
        src,
        progress: opts.progress.clone(),
    };
    if let Some(p) = &work.progress {
        let layers: Vec<(Digest, u64)> = image
            .layers
            .iter()
            .map(|l| (l.descriptor.digest.clone(), l.descriptor.size))
            .collect();
        p.start(&layers);
    }
    let needed = skip_shadowed
        .then(|| needed_entries(cache, image))
        .flatten();
    let indexes: Vec<LayerIndex> = futures_util::stream::iter(image.layers.iter().enumerate())
        .map(|(i, layer)| {
            let target = Extraction {
                dir: staging[i].clone(),
                needed: needed.as_ref().map(|n| n[i].clone()),
                with_meta,
                warnings: warnings.clone(),
                limits: opts.limits,
                cancel: opts.cancel.clone(),
            };
            work.layer(i, layer, target)
        })
        .buffered(opts.jobs.max(1))
        .try_collect()
        .await?;
    if let Some(p) = &work.progress {
        p.finish();
    }
    Ok((indexes, staging))
}

/// What the layers of one pull share while they are fetched and extracted.
struct LayerWork<'a> {
    cache: &'a Cache,
    src: &'a Source,
    progress: Option<Arc<dyn PullProgress>>,
}

impl LayerWork<'_> {
    /// Tell the caller what layer `i` is doing now.
    fn tell(&self, i: usize, state: &str) {
        if let Some(p) = &self.progress {
            p.state(i, state);
        }
    }

    /// Extract layer `i` (from the cache, else while it downloads) and cache the index made
    /// on the way.
    async fn layer(&self, i: usize, layer: &Layer, target: Extraction) -> Result<LayerIndex> {
        let digest = &layer.descriptor.digest;
        let result = if self.cache.has_blob(digest) {
            self.extract_cached(i, layer, target).await
        } else {
            self.extract_while_downloading(i, layer, target).await
        }
        .map_err(|e| in_layer(e, i, digest));
        self.tell(i, "done");
        let index = result?;
        // Never over a cached one: it may carry seek points (built by a mount) that this
        // one lacks, and rewriting an unchanged index is wasted work.
        if !self.cache.has_index(digest)
            && let Err(e) = self.cache.store_index(digest, &index)
        {
            tracing::warn!("not caching the index of {digest}: {e}");
        }
        Ok(index)
    }

    /// Extract layer `i` from its cached blob.
    async fn extract_cached(
        &self,
        i: usize,
        layer: &Layer,
        target: Extraction,
    ) -> Result<LayerIndex> {
        let blob = self.cache.blob_path(&layer.descriptor.digest);
        let compression = layer.compression;
        self.tell(i, "extracting");
        tokio::task::spawn_blocking(move || {
            let tar = crate::layer::open_tar_stream(&blob, compression)?;
            target.extract(tar)
        })
        .await
        .map_err(Error::worker)?
    }

    /// Extract layer `i` while it downloads. The bytes are verified when the download ends;
    /// on a mismatch the fetch fails and this pull's output is dropped.
    async fn extract_while_downloading(
        &self,
        i: usize,
        layer: &Layer,
        target: Extraction,
    ) -> Result<LayerIndex> {
        let compression = layer.compression;
        let attempt = || {
            let target = target.clone();
            move |r| {
                let tar = crate::layer::decompress(r, compression)
                    .ctx(|| "starting to decompress".into())?;
                target.extract(tar)
            }
        };
        // Once more from the registry: this layer's staging dir emptied first.
        let again = async || {
            let d = target.dir.clone();
            tokio::task::spawn_blocking(move || {
                if !rustix::process::geteuid().is_root() {
                    git::make_writable(&d);
                }
                std::fs::remove_dir_all(&d).ctx(|| format!("emptying {}", d.display()))
            })
            .await
            .map_err(Error::worker)??;
            self.tell(i, "again, from the registry");
            Ok(())
        };
        let sink = &self.progress;
        let progress = |n: u64| {
            if let Some(p) = sink {
                p.bytes(i, n);
            }
        };
        self.tell(i, "downloading and extracting");
        crate::fetch::consume(
            self.cache,
            self.src,
            &layer.descriptor,
            crate::fetch::Keep::Named,
            &progress,
            attempt,
            again,
        )
        .await
        .map(|(index, _)| index)
    }
}

/// A malformed-layer error named by the layer it is in (`i`, from 0, with `digest`): the
/// extractor sees only a tar stream.
fn in_layer(e: Error, i: usize, digest: &Digest) -> Error {
    match e {
        Error::Malformed { what, reason } => Error::Malformed {
            what: format!("{what} in layer {} ({digest})", i + 1),
            reason,
        },
        other => other,
    }
}

/// Where and how one layer is extracted; cloned into the thread that does it (once per try).
#[derive(Clone)]
struct Extraction {
    /// The layer's staging directory.
    dir: PathBuf,
    /// The entries whose data the final tree keeps, when that is known.
    needed: Option<Arc<HashSet<u32>>>,
    with_meta: bool,
    warnings: Warnings,
    limits: index::Limits,
    cancel: tokio_util::sync::CancellationToken,
}

impl Extraction {
    /// Index and extract the layer's tar stream (see [`extract_layer`]).
    fn extract(&self, tar: Box<dyn std::io::Read + Send>) -> Result<LayerIndex> {
        extract_layer(
            tar,
            &self.dir,
            self.needed.as_ref(),
            self.with_meta,
            &self.warnings,
            self.limits,
            &self.cancel,
        )
    }
}

/// When every layer's index is cached, the merged tree is known before any byte is extracted:
/// then only the files it keeps need writing. Returns, per layer position, the entry positions
/// whose data survives.
fn needed_entries(cache: &Cache, image: &Image) -> Option<Vec<Arc<HashSet<u32>>>> {
    let indexes: Vec<LayerIndex> = image
        .layers
        .iter()
        .map(|l| crate::obtain::cached_entries(cache, &l.descriptor.digest))
        .collect::<Option<_>>()?;
    let refs: Vec<&LayerIndex> = indexes.iter().collect();
    let tree = tree::merge(&refs, &[]).ok()?;
    let mut needed = vec![HashSet::new(); image.layers.len()];
    for d in tree.walk() {
        if let Some(data) = tree.inode_of(d).data {
            needed[data.layer as usize].insert(data.entry);
        }
    }
    Some(needed.into_iter().map(Arc::new).collect())
}

/// Stream one layer's tar: index it, and write each regular file to `dir/<index position>`
/// with its metadata — only those in `needed`, when that is known.
fn extract_layer(
    tar: Box<dyn std::io::Read + Send>,
    dir: &Path,
    needed: Option<&Arc<HashSet<u32>>>,
    with_meta: bool,
    warnings: &Warnings,
    limits: index::Limits,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<LayerIndex> {
    std::fs::create_dir(dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut buf = vec![0u8; 256 << 10];
    index::build(tar, limits, |entry, pos, data| {
        if needed.is_some_and(|n| !n.contains(&(pos as u32))) {
            return Ok(());
        }
        let path = dir.join(pos.to_string());
        let mut f = apply::create_options(if with_meta { entry.mode } else { 0o600 })
            .open(&path)
            .ctx(|| format!("creating {}", path.display()))?;
        let mut written = 0u64;
        let sparse = !entry.sparse.is_empty();
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::malformed(
                        "layer tar",
                        format!("entry {:?}: data unreadable: {e}", entry.path),
                    ));
                }
            };
            // A sparse file's zeros stay holes (a hole reads as one run of zeros).
            if sparse && buf[..n].iter().all(|&b| b == 0) {
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Current(n as i64))
            } else {
                std::io::Write::write_all(&mut f, &buf[..n]).map(|()| 0)
            }
            .ctx(|| format!("writing {}", path.display()))?;
            written += n as u64;
        }
        if sparse {
            f.set_len(written)
                .ctx(|| format!("writing {}", path.display()))?;
        }
        if written != entry.size {
            return Err(Error::malformed(
                "layer tar",
                format!(
                    "entry {:?} is truncated ({written} of {} bytes)",
                    entry.path, entry.size
                ),
            ));
        }
        if with_meta {
            apply::file_meta(&f, &path, entry, warnings)?;
        }
        Ok(())
    })
}
