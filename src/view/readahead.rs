//! Readahead: fetching the spans ahead of a sequential reader (a window that grows) and
//! decompressing the next piece before it is asked for.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::pieces::piece_at;
use super::{ImageView, LayerData, Prefetch, Reader};
use crate::index::seek_points::SPAN;
use crate::manifest::Compression;
use crate::tree::InodeId;

/// How far ahead of a sequential reader spans are fetched, like the kernel's readahead: a
/// window that starts at `READAHEAD_MIN` × [`SPAN`] bytes of output and doubles while the
/// reader goes on, up to `READAHEAD_MAX` × [`SPAN`], never past the end of the file being
/// read. When fewer than half of the
/// window's spans are stored or on their way, the missing ones go in one range request.
/// Big requests matter to the registry: each costs it milliseconds of CPU however small
/// (BENCHMARKS.md, "Measurements behind design choices"). A batch is verified span by span as
/// it streams in, so a reader waits for its own span only, and a batch holds a few spans in
/// memory at most (the one arriving and two on their way to the store).
pub(super) const READAHEAD_MIN: usize = 2;
pub(super) const READAHEAD_MAX: usize = 16;

impl Reader {
    /// When a reader has just moved from span `k - 1` into `k` of a file whose data ends at
    /// uncompressed offset `file_end`, make sure the spans of the readahead window after `k`
    /// are stored or coming: when under half of them are, fetch the missing ones in one
    /// request and widen the window. A read elsewhere starts the window over.
    pub(super) fn read_ahead(&self, layer: &Arc<LayerData>, k: usize, file_end: u64) {
        let prev = layer.last_span.swap(k, Ordering::Relaxed);
        let f = &self.fetcher;
        if prev.wrapping_add(1) != k {
            if prev != k {
                layer.window.store(READAHEAD_MIN, Ordering::Relaxed);
            }
            return;
        }
        if self.prefetch == Prefetch::None
            || layer.src.is_local()
            || layer.no_ranges.load(Ordering::Relaxed)
        {
            return;
        }
        let Ok(sp) = layer.seek() else { return };
        let n = sp.span_digests.len();
        // Nothing past the spans that hold this file.
        let end = sp
            .span_at(file_end.saturating_sub(1))
            .map_or(n, |j| j + 1)
            .min(n);
        // The window is counted in output bytes (`SPAN`s of them), not in spans, so that an
        // index with closer seek points keeps as many bytes in flight.
        let w = layer.window.load(Ordering::Relaxed);
        let Some(base) = sp.checkpoints.get(k + 1).map(|c| c.out_offset) else {
            return;
        };
        let reach = w as u64 * SPAN;
        let ahead = |j: usize| sp.checkpoints[j].out_offset - base;
        let horizon = (k + 1..end).find(|&j| ahead(j) >= reach).unwrap_or(end);
        let ready =
            |j: usize| f.gates.busy(&(layer.id, j)) || f.cache.has_chunk(&sp.span_digests[j]);
        let first = (k + 1..horizon).find(|&j| !ready(j));
        let Some(first) = first.filter(|&j| ahead(j) < reach / 2) else {
            return;
        };
        let last = (first..horizon)
            .take_while(|&j| !ready(j))
            .last()
            .unwrap_or(first);
        layer
            .window
            .store((w * 2).min(READAHEAD_MAX), Ordering::Relaxed);
        let (fetcher, layer) = (f.clone(), layer.clone());
        f.rt.spawn_blocking(move || {
            // Best effort: what did not come is fetched by the read that needs it.
            let _ = fetcher.fetch_batch(&layer, first..last + 1);
        });
    }

    /// Called after answering a read of `len` bytes at `offset` of file `inode`: when reads
    /// of its layer go sequentially and this one has passed the middle of its piece, the
    /// next piece is decompressed now, by the thread that answered, so that the reader
    /// finds it ready instead of waiting for it (with two cores, serving one piece and
    /// decompressing the next overlap). Nothing happens for other reads, when that piece
    /// is cached or being made, or, with `--prefetch none`, when it would be fetched.
    pub fn decompress_ahead(&self, layer: &Arc<LayerData>, entry: usize, offset: u64, len: usize) {
        let entry = &layer.index.entries[entry];
        let local = layer.local.get().is_some();
        // Sparse files are rare: their reads are not worth a second mapping here.
        if layer.toc.is_some()
            || !entry.sparse.is_empty()
            || (layer.compression == Compression::None && local)
            || (self.prefetch == Prefetch::None && !local)
        {
            return;
        }
        let start = entry.offset + offset;
        let prev = layer.last_end.swap(start + len as u64, Ordering::Relaxed);
        // Readahead sends a few reads at once, so "sequential" allows some reordering.
        if prev.abs_diff(start) > SPAN {
            return;
        }
        let Ok(sp) = layer.seek() else { return };
        let Ok((_, cur_start, cur_len)) = piece_at(sp, layer.data_end, start) else {
            return;
        };
        let next = cur_start + cur_len as u64;
        if start + (len as u64) < cur_start + cur_len as u64 / 2
            || next >= entry.offset + entry.stored_len()
        {
            return;
        }
        let Ok((k, piece_start, piece_len)) = piece_at(sp, layer.data_end, next) else {
            return;
        };
        let key = (layer.id, piece_start);
        if self.making.busy(&key) || self.pieces.lock().unwrap().contains(&key) {
            return;
        }
        // Stored blocks are read straight from the blob: nothing to make ahead.
        if layer.compression == Compression::Gzip
            && let Some(f) = layer.local.get()
            && let Ok(Some(run)) = layer.stored(f, sp, k)
            && run.covers(piece_start, 1)
        {
            return;
        }
        let file_end = entry.offset + entry.stored_len();
        if let Err(e) = self.piece_cached(key, true, || {
            self.make_piece(layer, k, piece_start, piece_len, file_end)
        }) {
            tracing::debug!("decompressing ahead in layer {}: {e}", layer.digest);
        }
    }
}

impl ImageView {
    /// [`Reader::decompress_ahead`] for a read of `len` bytes at `offset` of file `inode`.
    pub fn decompress_ahead(&self, inode: InodeId, offset: u64, len: usize) {
        if let Some(data) = self.tree.inodes[inode as usize].data {
            let layer = &self.layers[data.layer as usize];
            self.reader
                .decompress_ahead(layer, data.entry as usize, offset, len);
        }
    }
}
