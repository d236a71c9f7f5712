//! The piece cache: decompressed pieces (at most 4 MiB from a seek point, or one TOC chunk)
//! in an LRU bounded by bytes, each made once (single-flight), and how a span is cut into
//! pieces.

use std::sync::Arc;

use bytes::Bytes;

use super::fetcher::SpanError;
use super::gates::Done;
use super::layer::decompress_at;
use super::{LayerData, PieceKey, Reader};
use crate::bufpool;
use crate::index::SeekPoints;
use crate::index::seek_points::SPAN;
use crate::layer::span::SpanBytes;

/// Decompressed pieces, least recently used out first, bounded by their bytes: a count
/// would let a run of small pieces (the small files of a TOC layer, one chunk each) push out
/// the big one a reader keeps coming back to (a shared library read through page faults),
/// which then costs a decompression and a digest every time.
pub(super) struct PieceCache {
    lru: lru::LruCache<PieceKey, Bytes>,
    bytes: usize,
    budget: usize,
}

impl PieceCache {
    pub(super) fn new(budget: usize) -> PieceCache {
        PieceCache {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    pub(super) fn get(&mut self, key: &PieceKey) -> Option<&Bytes> {
        self.lru.get(key)
    }

    pub(super) fn contains(&self, key: &PieceKey) -> bool {
        self.lru.contains(key)
    }

    /// Keep `piece`: older pieces go until the cache is within its budget (never `piece`
    /// itself), then it is the most recently used, or with `ahead` the next to go.
    pub(super) fn put(&mut self, key: PieceKey, piece: Bytes, ahead: bool) {
        self.bytes += piece.len();
        if let Some(old) = self.lru.put(key, piece) {
            self.bytes -= old.len();
        }
        // Evicted before `ahead` demotes it: a piece made ahead must not be the one it
        // makes room for.
        while self.bytes > self.budget && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, gone)) => self.bytes -= gone.len(),
                None => break,
            }
        }
        if ahead {
            self.lru.demote(&key);
        }
    }
}

impl Reader {
    pub(super) fn piece(
        &self,
        key: PieceKey,
        make: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<Bytes> {
        self.piece_cached(key, false, make)
    }

    /// [`ImageView::piece`]; a piece made `ahead` of its reader goes in as the next to be
    /// evicted, so that pieces made ahead never push out pieces being read (with several
    /// sequential readers they would, and every reader would find its piece gone).
    pub(super) fn piece_cached(
        &self,
        key: PieceKey,
        ahead: bool,
        make: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<Bytes> {
        if let Some(s) = self.pieces.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        // Decompress outside the cache lock, so that readers of other spans go on; readers
        // of this span wait at its gate and then find it cached.
        let gate = self.making.gate(key);
        let _turn = gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _done = Done(&self.making, key);
        if let Some(s) = self.pieces.lock().unwrap().get(&key) {
            return Ok(s.clone());
        }
        let made = make().map(bufpool::freeze);
        if let Ok(s) = &made {
            // Cached before the gate goes, so a newcomer finds it rather than a new gate.
            self.pieces.lock().unwrap().put(key, s.clone(), ahead);
        }
        made
    }

    /// Decompress `want` bytes from `from` (inside span `k`, for a file whose data ends at
    /// `file_end`): from the local blob, or from the span fetched by range (verified), or
    /// from the blob once a range would not do.
    pub(super) fn make_piece(
        &self,
        layer: &Arc<LayerData>,
        k: usize,
        from: u64,
        want: usize,
        file_end: u64,
    ) -> std::io::Result<Vec<u8>> {
        // An index without windows: the span's comes beside it (one round trip for both).
        let pending = self.fetcher.start_window(layer, k);
        let window = |pending: Option<_>| {
            pending
                .map(|p| self.fetcher.finish_window(layer, p))
                .transpose()
        };
        if let Some(f) = layer.local.get() {
            return self.decompress_local(layer, f, k, from, want, pending);
        }
        let sp = layer.seek()?;
        self.read_ahead(layer, k, file_end);
        match self.fetcher.span(layer, k) {
            Ok(bytes) => {
                let w = window(pending)?;
                let (a, _) = sp.span_range(k, layer.descriptor.size);
                let mut r = SpanBytes::new(a, bytes);
                let w = w.as_deref().map(|w| (k, w));
                decompress_at(&mut r, layer.compression, sp, from, want, w)
            }
            Err(SpanError::Failed(e)) => Err(e),
            Err(SpanError::NeedBlob) => {
                let f = self.fetcher.ensure_local(layer)?;
                self.decompress_local(layer, f, k, from, want, pending)
            }
        }
    }

    /// [`LayerData::decompress_local`] of span `k`, with its window when the index came
    /// without windows (`pending`). The blob is here: when the window cannot be had (no
    /// network), decompression starts instead from the nearest earlier checkpoint whose
    /// window is stored or that needs none — slower, never wrong.
    fn decompress_local(
        &self,
        layer: &LayerData,
        f: &std::fs::File,
        k: usize,
        from: u64,
        want: usize,
        pending: Option<super::windows::PendingWindow>,
    ) -> std::io::Result<Vec<u8>> {
        let Some(pending) = pending else {
            return layer.decompress_local(f, from, want, None);
        };
        match self.fetcher.finish_window(layer, pending) {
            Ok(w) => layer.decompress_local(f, from, want, Some((k, &w))),
            Err(e) => {
                let (j, w) = self.fetcher.known_window_before(layer, k);
                tracing::info!(
                    "window {k} of layer {} not had ({e}); decompressing its blob from seek \
                     point {j}",
                    layer.digest
                );
                layer.decompress_local(f, from, want, Some((j, &w)))
            }
        }
    }
}

/// The span holding uncompressed offset `pos`, and the piece of it that does (see
/// [`piece_of`]): (span, piece start, piece length). The last span, whose end the seek
/// points do not give, is taken to end with the layer's file data (`data_end`), so that
/// its short tail joins a piece too.
pub(super) fn piece_at(
    sp: &SeekPoints,
    data_end: u64,
    pos: u64,
) -> std::io::Result<(usize, u64, usize)> {
    let k = sp
        .span_at(pos)
        .ok_or_else(|| std::io::Error::other("no seek point before the requested offset"))?;
    let (cp_start, cp_end) = sp.span_output(k);
    let cp_end = cp_end.or(Some(data_end).filter(|&e| e > pos));
    let (start, len) = piece_of(cp_start, cp_end, pos);
    Ok((k, start, len))
}

/// The piece of span `[cp_start, cp_end)` (`None`: to the end of the layer) that holds
/// uncompressed offset `pos`, as (start, length). Pieces are the unit decompressed and
/// cached: [`SPAN`] bytes aligned from the seek point, however far apart seek points
/// are (a single-frame zstd layer has only one). A span's tail shorter than a quarter piece
/// is part of the piece before it: as a piece of its own, reaching it would mean
/// decompressing the whole piece before it again (seek points are a little over SPAN
/// apart, so every span would cost two decompressions of it).
pub(super) fn piece_of(cp_start: u64, cp_end: Option<u64>, pos: u64) -> (u64, usize) {
    let span = SPAN;
    let i = (pos - cp_start) / span;
    let Some(end) = cp_end else {
        return (cp_start + i * span, span as usize);
    };
    let whole = (end - cp_start) / span;
    let last = if whole > 0 && (end - cp_start) % span <= span / 4 {
        whole - 1
    } else {
        whole
    };
    let piece_start = cp_start + i.min(last) * span;
    let piece_end = if i >= last { end } else { piece_start + span };
    (piece_start, (piece_end - piece_start) as usize)
}

#[cfg(test)]
mod cache_tests {
    use super::PieceCache;
    use bytes::Bytes;

    fn piece(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn small_pieces_do_not_push_out_a_big_one_within_the_budget() {
        let mut c = PieceCache::new(10_000);
        c.put((0, 0), piece(6_000), false);
        for k in 1..=30 {
            c.put((1, k), piece(100), false);
        }
        assert!(
            c.contains(&(0, 0)),
            "the big piece stays: 6,000 + 3,000 bytes fit"
        );
        assert!((1..=30).all(|k| c.contains(&(1, k))));
    }

    #[test]
    fn the_budget_holds_least_recently_used_first_and_ahead_goes_next() {
        let mut c = PieceCache::new(10_000);
        c.put((0, 0), piece(4_000), false);
        c.put((0, 1), piece(4_000), false);
        assert!(c.get(&(0, 0)).is_some());
        c.put((0, 2), piece(4_000), false);
        assert!(!c.contains(&(0, 1)), "least recently used went");
        assert!(c.contains(&(0, 0)) && c.contains(&(0, 2)));
        c.put((0, 3), piece(1_000), true);
        c.put((0, 4), piece(1_500), false);
        assert!(!c.contains(&(0, 3)), "a piece made ahead is the next to go");
        // A piece made ahead into a full cache stays; the oldest other piece makes room.
        let mut full = PieceCache::new(10_000);
        full.put((0, 0), piece(4_500), false);
        full.put((0, 1), piece(4_500), false);
        full.put((0, 2), piece(4_500), true);
        assert!(
            full.contains(&(0, 2)),
            "the piece made ahead was dropped at once"
        );
        assert!(!full.contains(&(0, 0)) && full.contains(&(0, 1)));
        // One piece over the budget is still kept: the reader that made it needs it.
        let mut one = PieceCache::new(10);
        one.put((0, 0), piece(100), false);
        assert!(one.contains(&(0, 0)));
    }
}

#[cfg(test)]
mod tests {
    use super::piece_of;
    use crate::bufpool;
    use crate::index::SeekPoints;
    use crate::index::seek_points::SPAN;
    use crate::manifest::Compression;
    use crate::view::layer::decompress_at;

    #[test]
    fn a_reused_piece_buffer_never_adds_old_bytes() {
        // An uncompressed span is appended to the buffer it is given: bytes left in a
        // reused one would be served as file data.
        let data: Vec<u8> = (0..SPAN as usize).map(|i| (i % 251) as u8).collect();
        let sp = SeekPoints::default();
        for round in 0..3 {
            let mut dirty = Vec::with_capacity(bufpool::CAP);
            dirty.extend_from_slice(&[0xEE; 1000]);
            bufpool::put_dirty(dirty);
            let got = decompress_at(
                &mut std::io::Cursor::new(&data[..]),
                Compression::None,
                &sp,
                0,
                data.len(),
                None,
            )
            .unwrap();
            assert!(got == data, "round {round}");
            // and a piece's buffer goes back for the next round
            drop(bufpool::freeze(got));
        }
    }

    /// The pieces met walking a span byte range by byte range: (start, len) each.
    fn pieces(cp_start: u64, cp_end: Option<u64>, upto: u64) -> Vec<(u64, usize)> {
        let mut out: Vec<(u64, usize)> = Vec::new();
        let mut pos = cp_start;
        while pos < upto {
            let p = piece_of(cp_start, cp_end, pos);
            assert!(p.0 <= pos && pos < p.0 + p.1 as u64, "{pos} outside {p:?}");
            if out.last() != Some(&p) {
                out.push(p);
            }
            pos += 64 << 10;
        }
        out
    }

    #[test]
    fn a_span_a_little_over_a_piece_is_one_piece() {
        // gzip seek points land a deflate block after each SPAN of output
        let end = 1000 + SPAN + 70_000;
        assert_eq!(
            pieces(1000, Some(end), end),
            vec![(1000, (SPAN + 70_000) as usize)]
        );
    }

    #[test]
    fn long_spans_are_cut_in_pieces_that_tile_them() {
        for extra in [0, 1, SPAN / 4, SPAN / 4 + 1, SPAN / 2, SPAN - 1] {
            let end = 5 + 3 * SPAN + extra;
            let ps = pieces(5, Some(end), end);
            assert_eq!(ps[0].0, 5);
            for w in ps.windows(2) {
                assert_eq!(w[0].0 + w[0].1 as u64, w[1].0, "gap or overlap ({extra})");
            }
            let last = ps.last().unwrap();
            assert_eq!(
                last.0 + last.1 as u64,
                end,
                "pieces end with the span ({extra})"
            );
            // a short tail joins the piece before it; a longer one is a piece of its own
            let expect = if extra == 0 || extra > SPAN / 4 {
                3 + (extra > 0) as usize
            } else {
                3
            };
            assert_eq!(ps.len(), expect, "extra {extra}");
        }
    }

    #[test]
    fn an_open_ended_span_has_span_sized_pieces() {
        let ps = pieces(0, None, 3 * SPAN);
        assert_eq!(
            ps,
            vec![
                (0, SPAN as usize),
                (SPAN, SPAN as usize),
                (2 * SPAN, SPAN as usize)
            ]
        );
    }
}
