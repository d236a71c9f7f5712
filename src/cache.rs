//! The content-addressed store on disk — a store only: it names verified files and finds
//! them; downloading them is `crate::fetch`'s. `blobs/sha256/<hex>`, each blob verified before
//! it got its name; `indexes/sha256/<layer hex>`, the layer indexes built from them (and
//! `.published` ones fetched from registries — a slim one with a `.windows` file naming
//! the blob its windows are in —, and `<image manifest hex>.profile`, access profiles
//! published with them); `chunks/blake3/<hex>`, compressed spans of
//! layers fetched by range, named by their span digest; `chunks/sha256/<hex>`, eStargz
//! chunks and TOCs, named by their sha256. Writes go to `tmp/` and are renamed into place, so
//! a reader never sees a partial file, even after a crash. Any blob or chunk may be deleted
//! at any time (`imgfs cache prune`): readers keep open files, and a missing chunk is
//! refetched.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, SpanDigest};
use crate::error::{IoContext, Result};
use crate::index::LayerIndex;

/// What a cache file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Blob,
    Index,
    Chunk,
    /// Downloads in progress, or left by a crash.
    Tmp,
    /// Mount daemons' logs.
    Log,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Blob, Kind::Index, Kind::Chunk, Kind::Tmp, Kind::Log];

    fn dirs(self) -> &'static [&'static str] {
        match self {
            Kind::Blob => &["blobs/sha256"],
            Kind::Index => &["indexes/sha256"],
            Kind::Chunk => &[<Digest as ChunkName>::DIR, <SpanDigest as ChunkName>::DIR],
            Kind::Tmp => &["tmp"],
            Kind::Log => &["logs"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Index => "indexes",
            Kind::Chunk => "chunks",
            Kind::Tmp => "tmp",
            Kind::Log => "logs",
        }
    }
}

/// One file in the cache.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    pub kind: Kind,
    /// The digest hex (or temporary name).
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Last use (the file's mtime, refreshed when a blob is opened or a chunk read).
    pub used: std::time::SystemTime,
}

/// What names a stored chunk: the digest it was verified against, which says where it is
/// kept. eStargz chunks and TOCs are named by their SHA-256 (the image's own digests), spans
/// of other layers by the BLAKE3 digest their index recorded.
pub trait ChunkName: std::fmt::Display {
    /// The chunk store's directory for chunks named this way.
    const DIR: &'static str;
    fn file_name(&self) -> String;
    fn matches(&self, bytes: &[u8]) -> bool;
}

impl ChunkName for Digest {
    const DIR: &'static str = "chunks/sha256";
    fn file_name(&self) -> String {
        self.hex().to_string()
    }
    fn matches(&self, bytes: &[u8]) -> bool {
        Digest::of(bytes) == *self
    }
}

impl ChunkName for SpanDigest {
    const DIR: &'static str = "chunks/blake3";
    fn file_name(&self) -> String {
        self.hex()
    }
    fn matches(&self, bytes: &[u8]) -> bool {
        SpanDigest::of(bytes) == *self
    }
}

/// How many stored chunks a process remembers having verified (see [`Cache::load_chunk`]).
const STORED_HERE_MAX: usize = 100_000;

/// `IMGFS_CHECK_CHUNKS=1`: check every chunk loaded, even those this process stored.
fn check_every_chunk() -> bool {
    static CHECK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHECK.get_or_init(|| std::env::var_os("IMGFS_CHECK_CHUNKS").is_some_and(|v| v == "1"))
}

/// A cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    /// Chunks this process stored, from bytes it had verified, with their lengths: loading
    /// one needs no new check (see [`Cache::load_chunk`]). Shared by clones.
    stored_here: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, usize>>>,
}

/// How long an unlocked temporary file may be idle before it counts as abandoned.
const TMP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl Cache {
    /// `$XDG_CACHE_HOME/imgfs`, else `~/.cache/imgfs`.
    pub fn default_dir() -> PathBuf {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("imgfs")
    }

    /// Open (creating if needed) a cache rooted at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        let chunks = Kind::Chunk.dirs().iter();
        for sub in ["blobs/sha256", "indexes/sha256", "tmp"]
            .iter()
            .chain(chunks)
        {
            let d = root.join(sub);
            std::fs::create_dir_all(&d)
                .ctx(|| format!("creating cache directory {}", d.display()))?;
        }
        Ok(Cache {
            root: root.to_path_buf(),
            stored_here: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `d` lives once stored.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn index_path(&self, layer: &Digest) -> PathBuf {
        self.root.join("indexes/sha256").join(layer.hex())
    }

    /// Where an index fetched from a registry (an index artifact) is kept: apart from the
    /// ones built here, so that `pull`, `index push` and `--no-remote-index` use only those.
    fn published_index_path(&self, layer: &Digest) -> PathBuf {
        self.root
            .join("indexes/sha256")
            .join(format!("{}.published", layer.hex()))
    }

    /// Whether an index of `layer` built here exists (not whether it is sound).
    pub fn has_index(&self, layer: &Digest) -> bool {
        self.index_path(layer).is_file()
    }

    /// Whether an index of `layer` fetched from a registry exists (a slim one with the file
    /// naming its windows blob: pruning may have taken one of the two).
    pub fn has_published_index(&self, layer: &Digest) -> bool {
        let path = self.published_index_path(layer);
        let mut head = [0u8; 12];
        let Ok(mut f) = std::fs::File::open(&path) else {
            return false;
        };
        use std::io::Read;
        let slim = f.read_exact(&mut head).is_ok() && crate::index::codec::is_slim_header(&head);
        !slim || self.windows_path(layer).is_file()
    }

    /// The index of `layer` built here, if there is a sound one. A damaged or outdated file
    /// is removed (and said once in the log), so that it is rebuilt.
    pub fn load_index(&self, layer: &Digest) -> Option<LayerIndex> {
        Self::load_index_at(&self.index_path(layer), layer)
    }

    /// The index of `layer` fetched from a registry, if there is a sound one: a full one,
    /// or a slim one made usable with the windows blob named beside it (`index::windows`).
    pub fn load_published_index(&self, layer: &Digest) -> Option<LayerIndex> {
        let path = self.published_index_path(layer);
        let bytes = std::fs::read(&path).ok()?;
        if !crate::index::codec::is_slim(&bytes) {
            return Self::load_index_at(&path, layer);
        }
        let slim = std::fs::read_to_string(self.windows_path(layer))
            .ok()
            .and_then(|w| {
                let (digest, size) = w.trim().split_once(' ')?;
                Some((Digest::parse(digest).ok()?, size.parse::<u64>().ok()?))
            })
            .ok_or_else(|| "its windows blob is not named".to_string())
            .and_then(|(windows, size)| {
                let index =
                    crate::index::codec::decode_slim(layer, &bytes).map_err(|e| e.to_string())?;
                crate::index::windows::take_apart(index, windows, size).map_err(|e| e.to_string())
            });
        match slim {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!("discarding the published index of {layer}: {e}");
                self.remove_published_index(layer);
                None
            }
        }
    }

    /// Where the windows blob of a slim published index of `layer` is named.
    fn windows_path(&self, layer: &Digest) -> PathBuf {
        self.root
            .join("indexes/sha256")
            .join(format!("{}.windows", layer.hex()))
    }

    /// Forget the published index of `layer` (it did not fit the image).
    pub fn remove_published_index(&self, layer: &Digest) {
        let _ = std::fs::remove_file(self.published_index_path(layer));
        let _ = std::fs::remove_file(self.windows_path(layer));
    }

    fn load_index_at(path: &Path, layer: &Digest) -> Option<LayerIndex> {
        let bytes = std::fs::read(path).ok()?;
        match crate::index::codec::decode(layer, &bytes) {
            Ok(idx) => Some(idx),
            // Written by another imgfs version: expected after an upgrade, not damage.
            Err(_) if crate::index::codec::is_other_version(&bytes) => {
                tracing::info!("the cached index of {layer} has another format; rebuilding it");
                let _ = std::fs::remove_file(path);
                None
            }
            Err(e) => {
                tracing::warn!("discarding cached index of {layer}: {e}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// The encoded index of `layer` built here, if it is sound (for publishing it as is).
    pub fn load_index_bytes(&self, layer: &Digest) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.index_path(layer)).ok()?;
        crate::index::codec::decode(layer, &bytes).ok()?;
        Some(bytes)
    }

    /// Store the index of `layer` (atomically; a concurrent writer of the same index is fine).
    pub fn store_index(&self, layer: &Digest, index: &LayerIndex) -> Result<()> {
        self.store_index_bytes(layer, &crate::index::codec::encode(layer, index))
    }

    /// Store an index of `layer` fetched from a registry, which the caller has decoded and
    /// checked.
    pub fn store_published_index(&self, layer: &Digest, bytes: &[u8]) -> Result<()> {
        self.store_index_file(
            &self.published_index_path(layer),
            &format!("the index of {layer}"),
            bytes,
        )
    }

    /// Store a slim index of `layer` fetched from a registry (decoded and checked by the
    /// caller) and the windows blob (`windows`, `size` bytes) its windows are in — named
    /// first, so that a reader never finds the index without it.
    pub fn store_published_slim(
        &self,
        layer: &Digest,
        bytes: &[u8],
        windows: &Digest,
        size: u64,
    ) -> Result<()> {
        let what = format!("the windows of {layer}");
        let named = format!("{windows} {size}\n");
        self.store_index_file(&self.windows_path(layer), &what, named.as_bytes())?;
        self.store_published_index(layer, bytes)
    }

    /// Where the access profile published with the index artifact of image manifest
    /// `image` is kept: beside the published indexes, and pruned with them.
    fn profile_path(&self, image: &Digest) -> PathBuf {
        self.root
            .join("indexes/sha256")
            .join(format!("{}.profile", image.hex()))
    }

    /// Keep the access profile published for image manifest `image` (the caller has
    /// parsed it).
    pub fn store_published_profile(&self, image: &Digest, bytes: &[u8]) -> Result<()> {
        self.store_index_file(
            &self.profile_path(image),
            &format!("the access profile of {image}"),
            bytes,
        )
    }

    /// The access profile published for image manifest `image`, as fetched, if there is
    /// one.
    pub fn load_published_profile(&self, image: &Digest) -> Option<Vec<u8>> {
        std::fs::read(self.profile_path(image)).ok()
    }

    fn store_index_bytes(&self, layer: &Digest, bytes: &[u8]) -> Result<()> {
        self.store_index_file(
            &self.index_path(layer),
            &format!("the index of {layer}"),
            bytes,
        )
    }

    /// Write `bytes` (`what` they are, for errors) to `dest` in one rename.
    fn store_index_file(&self, dest: &Path, what: &str, bytes: &[u8]) -> Result<()> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .ctx(|| format!("creating a temporary file in {}", tmp_dir.display()))?;
        tmp.write_all(bytes).ctx(|| format!("writing {what}"))?;
        tmp.persist(dest)
            .map_err(|e| e.error)
            .ctx(|| format!("storing {}", dest.display()))?;
        Ok(())
    }

    fn chunk_path<N: ChunkName>(&self, d: &N) -> PathBuf {
        self.root.join(N::DIR).join(d.file_name())
    }

    pub fn has_chunk<N: ChunkName>(&self, d: &N) -> bool {
        self.chunk_path(d).is_file()
    }

    /// The stored chunk with digest `d`, if any; marks it used (for pruning, oldest first).
    /// Unlike blobs, chunks are not fsynced: after a crash a file could be there with wrong
    /// bytes. So a chunk is checked again when loaded — unless this process stored it and
    /// it has the length stored: a crash that could damage it would have ended this
    /// process too (the check costs a noticeable share of a read by range: BENCHMARKS.md).
    /// A cache on a network filesystem shared with other hosts, or one whose
    /// write-back failed, is outside that argument; `IMGFS_CHECK_CHUNKS=1` checks every
    /// load. A damaged chunk is removed, to be refetched.
    pub fn load_chunk<N: ChunkName>(&self, d: &N) -> Option<bytes::Bytes> {
        let path = self.chunk_path(d);
        let f = std::fs::File::open(&path).ok()?;
        let _ = f.set_modified(std::time::SystemTime::now());
        let len = f.metadata().ok()?.len();
        let mut buf = crate::bufpool::take(usize::try_from(len).ok()?);
        use std::io::Read;
        (&f).read_to_end(&mut buf).ok()?;
        let ours = self.stored_here.lock().unwrap().get(&path) == Some(&buf.len());
        if !ours && !d.matches(&buf) {
            tracing::warn!("discarding damaged chunk {}", path.display());
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(crate::bufpool::freeze(buf))
    }

    /// Store a chunk the caller has verified to have digest `d`.
    pub fn store_chunk<N: ChunkName>(&self, d: &N, bytes: &[u8]) -> Result<()> {
        let dest = self.chunk_path(d);
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)
            .ctx(|| format!("creating a temporary file in {}", tmp_dir.display()))?;
        tmp.write_all(bytes).ctx(|| format!("writing chunk {d}"))?;
        tmp.persist(&dest)
            .map_err(|e| e.error)
            .ctx(|| format!("storing {}", dest.display()))?;
        if !check_every_chunk() {
            let mut ours = self.stored_here.lock().unwrap();
            // A bound on what a long-lived daemon remembers: forgetting only costs checks.
            if ours.len() >= STORED_HERE_MAX {
                ours.clear();
            }
            ours.insert(dest, bytes.len());
        }
        Ok(())
    }

    /// Every stored file of `kind`, oldest use first.
    pub fn entries(&self, kind: Kind) -> Vec<CacheEntry> {
        let mut out: Vec<CacheEntry> = kind
            .dirs()
            .iter()
            .flat_map(|d| std::fs::read_dir(self.root.join(d)))
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| CacheEntry {
                    kind,
                    name: e.file_name().to_string_lossy().into_owned(),
                    path: e.path(),
                    size: m.len(),
                    used: m.modified().unwrap_or(std::time::UNIX_EPOCH),
                })
            })
            .collect();
        out.sort_by_key(|e| e.used);
        out
    }

    /// Temporary files no download is writing: a download holds a lock on its file for as
    /// long as it runs (the kernel drops it when the process dies, however it dies). Small
    /// files being written unlocked (an index, a chunk) take milliseconds: a file untouched
    /// for a minute is not one of them.
    pub fn abandoned_tmp(&self) -> Vec<CacheEntry> {
        let now = std::time::SystemTime::now();
        self.entries(Kind::Tmp)
            .into_iter()
            .filter(|e| now.duration_since(e.used).unwrap_or_default() > TMP_GRACE)
            .filter(|e| {
                std::fs::File::open(&e.path).is_ok_and(|f| {
                    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                        .is_ok()
                })
            })
            .collect()
    }

    /// What `imgfs cache prune` removes: temporary files no download holds, logs idle for a
    /// week, and blobs and chunks — all of them, or least recently used first until the
    /// cache holds at most `max_size` bytes; indexes too when `all` (otherwise they stay:
    /// they are small and costly to rebuild).
    pub fn prune_plan(&self, max_size: Option<u64>, all: bool) -> Vec<CacheEntry> {
        const STALE_LOG: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
        let now = std::time::SystemTime::now();
        let mut doomed = self.abandoned_tmp();
        doomed.extend(
            self.entries(Kind::Log)
                .into_iter()
                .filter(|e| now.duration_since(e.used).unwrap_or_default() > STALE_LOG),
        );
        // Blobs and chunks compete for the space, least recently used first.
        let mut data = self.entries(Kind::Blob);
        data.extend(self.entries(Kind::Chunk));
        data.sort_by_key(|e| e.used);
        let indexes = self.entries(Kind::Index);
        let Some(max) = max_size else {
            doomed.extend(data);
            if all {
                doomed.extend(indexes);
            }
            return doomed;
        };
        let mut total: u64 = data.iter().chain(&indexes).map(|e| e.size).sum();
        let mut pool = data;
        if all {
            pool.extend(indexes);
            pool.sort_by_key(|e| e.used);
        }
        for e in pool {
            if total <= max {
                break;
            }
            total -= e.size;
            doomed.push(e);
        }
        doomed
    }

    /// Remove one entry (running readers keep what they have open).
    pub fn remove(&self, e: &CacheEntry) -> std::io::Result<()> {
        std::fs::remove_file(&e.path)
    }

    /// Bytes in the chunk store.
    pub fn chunk_usage(&self) -> u64 {
        self.entries(Kind::Chunk).iter().map(|e| e.size).sum()
    }

    /// Remove the least recently used chunks until the store holds at most `target` bytes;
    /// returns what it then holds.
    pub fn trim_chunks(&self, target: u64) -> u64 {
        let entries = self.entries(Kind::Chunk);
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        for e in entries {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&e.path).is_ok() {
                total -= e.size;
            }
        }
        total
    }

    /// A new temporary file for a blob being downloaded, in `tmp/`, locked for as long as
    /// the handle lives: `cache prune` leaves locked files alone.
    pub fn new_blob_file(&self) -> Result<tempfile::NamedTempFile> {
        let tmp_dir = self.root.join("tmp");
        let f = tempfile::NamedTempFile::new_in(&tmp_dir)
            .ctx(|| format!("creating a temporary file in {}", tmp_dir.display()))?;
        rustix::fs::flock(f.as_file(), rustix::fs::FlockOperation::LockShared)
            .map_err(std::io::Error::from)
            .ctx(|| format!("locking {}", f.path().display()))?;
        Ok(f)
    }

    /// Give a downloaded blob its name. Only for bytes whose sha256 the caller has checked
    /// to be `digest` (and their size the descriptor's): nothing unverified gets a name.
    pub fn store_blob(
        &self,
        verified: tempfile::NamedTempFile,
        digest: &Digest,
    ) -> Result<PathBuf> {
        let dest = self.blob_path(digest);
        verified
            .as_file()
            .sync_data()
            .ctx(|| format!("writing blob {digest}"))?;
        verified
            .persist(&dest)
            .map_err(|e| e.error)
            .ctx(|| format!("storing {}", dest.display()))?;
        Ok(dest)
    }
}
