//! One layer of a view: its index and where its bytes come from (a local blob, read in place
//! or decompressed from a seek point, or spans fetched by range), and indexing a layer blob
//! while it streams.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::readahead::READAHEAD_MIN;
use crate::bufpool;
use crate::index::LayerIndex;
use crate::index::SeekPoints;
use crate::index::seek_points::Checkpoint;
use crate::layer::format::seekable;
use crate::layer::gzip::Stored;
use crate::manifest::{Compression, Descriptor};
use crate::obtain::TocFiles;

/// One layer: its descriptor and index, and where its bytes come from.
pub struct LayerData {
    pub digest: String,
    pub descriptor: Descriptor,
    pub compression: Compression,
    pub index: LayerIndex,
    /// The verified blob from the cache, open for the life of the view (so that pruning the
    /// cache never breaks a reader) — when there is one. Without it, reads go by range.
    pub(super) local: OnceLock<File>,
    /// The span the last read used, to notice sequential readers.
    pub(super) last_span: AtomicUsize,
    /// The sequential reader's readahead window, in `SPAN`s of output (see [`READAHEAD_MIN`]).
    pub(super) window: AtomicUsize,
    /// Where the last read of this layer through the mount ended (uncompressed), to notice
    /// sequential readers.
    pub(super) last_end: AtomicU64,
    /// Where the layer's last file data ends (uncompressed): the last span's pieces go no
    /// further.
    pub(super) data_end: u64,
    /// The source would not serve a range of this blob: reads need the whole blob.
    pub(super) no_ranges: AtomicBool,
    /// Unique in the process: what the piece cache and the fetch gates key this layer by,
    /// so that views of several images can share them.
    pub(super) id: u32,
    /// Where the layer's bytes come from (the source of the image it was opened with).
    pub(super) src: Arc<crate::source::Source>,
    /// For a layer read through its TOC (eStargz, zstd:chunked): each file's chunks.
    pub(super) toc: Option<TocFiles>,
    /// For a gzip layer read from its local blob: the run of stored blocks from each span's
    /// checkpoint (None: the span starts compressed), walked on first use.
    pub(super) stored: Mutex<lru::LruCache<usize, Option<Arc<Stored>>>>,
}

/// Spans per layer whose stored-block walk is remembered: 256 MiB of stored data in spans of
/// 4 MiB. A walk holds 4 bytes per block: about 1 KiB for zlib's usual 16 KiB blocks, at most
/// 64 KiB for a stream of tiny blocks (the walk's cap), so at most 4 MiB per layer.
pub(super) const STORED_SPANS: NonZeroUsize = NonZeroUsize::new(64).unwrap();

impl LayerData {
    pub(super) fn new(
        layer: &crate::manifest::Layer,
        src: Arc<crate::source::Source>,
        index: LayerIndex,
        toc: Option<TocFiles>,
    ) -> Arc<Self> {
        static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            src,
            toc,
            stored: Mutex::new(lru::LruCache::new(STORED_SPANS)),
        })
    }

    /// The stored run from span `k`'s checkpoint in the local blob `f`.
    pub(super) fn stored(
        &self,
        f: &File,
        sp: &SeekPoints,
        k: usize,
    ) -> std::io::Result<Option<Arc<Stored>>> {
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
    pub(super) fn read_stored(
        &self,
        f: &File,
        start: u64,
        len: usize,
    ) -> std::io::Result<Option<Vec<u8>>> {
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
    /// `window`: a checkpoint to start from and its window, when the index came without
    /// windows.
    pub(super) fn decompress_local(
        &self,
        f: &File,
        start: u64,
        len: usize,
        window: Option<(usize, &[u8])>,
    ) -> std::io::Result<Vec<u8>> {
        let r = PreadFile { file: f, pos: 0 };
        let mut r = std::io::BufReader::with_capacity(256 << 10, r);
        decompress_at(&mut r, self.compression, self.seek()?, start, len, window)
    }

    pub(super) fn seek(&self) -> std::io::Result<&SeekPoints> {
        self.index
            .seek
            .as_ref()
            .ok_or_else(|| std::io::Error::other("layer indexed without seek points"))
    }
}

/// A `Read + Seek` over a shared open file by `pread`, so threads never share a file offset.
pub(super) struct PreadFile<'a> {
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
/// the span of it holding `start`). `window`: when the index came without windows
/// (`index::windows`), the checkpoint to start from (at or before `start`) and its window;
/// a checkpoint of such an index holds none, and a decompression that needs one fails
/// instead of making wrong bytes.
pub(super) fn decompress_at(
    blob: &mut (impl std::io::BufRead + std::io::Seek),
    compression: Compression,
    sp: &SeekPoints,
    start: u64,
    len: usize,
    window: Option<(usize, &[u8])>,
) -> std::io::Result<Vec<u8>> {
    let out = bufpool::take(len);
    let Some((k, window)) = window else {
        return seekable(compression).read_at(blob, &sp.checkpoints, start, len, out);
    };
    let cp = sp
        .checkpoints
        .get(k)
        .filter(|c| c.out_offset <= start)
        .ok_or_else(|| std::io::Error::other("no seek point before the requested offset"))?;
    let cp = Checkpoint {
        window: window.to_vec(),
        ..cp.clone()
    };
    seekable(compression).read_at(blob, std::slice::from_ref(&cp), start, len, out)
}
