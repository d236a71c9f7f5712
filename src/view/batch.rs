//! A batch of spans fetched as one range request: which spans fit in one (their bounds in
//! the blob, within [`MAX_RANGE`]), and the body streamed and cut into them, each hashed as
//! it arrives (`Fetcher::fetch_batch` stores them and hands each to its readers).

use std::ops::Range;

use bytes::Bytes;
use futures_util::StreamExt;

use super::fetcher::MAX_RANGE;
use crate::bufpool;
use crate::digest::SpanDigest;
use crate::error::{Error, Result};
use crate::index::seek_points::SeekPoints;

/// One span of a batch as [`stream_spans`] hands it over: its position in the batch,
/// whether it matched its digest, its bytes.
pub(super) type BatchSpan = (usize, bool, Bytes);

/// Each span's compressed bytes `[start, end)` in the blob, in order.
pub(super) type Bounds = Vec<(u64, u64)>;

/// The spans `ks` can be fetched as one range, and each one's bytes (`span_range`): cut
/// short at [`MAX_RANGE`] bytes in all. `None` when no span fits, or the index's ranges are
/// not a run of overlapping or touching spans (a malformed index, which the reader's own
/// fetch will report).
pub(super) fn batch_bounds(
    sp: &SeekPoints,
    size: u64,
    ks: Range<usize>,
) -> Option<(Range<usize>, Bounds)> {
    let mut bounds: Bounds = ks.clone().map(|k| sp.span_range(k, size)).collect();
    // No more than MAX_RANGE in one request: the batch is cut short (its first span
    // alone may be more, and is then left to its reader).
    let a = bounds.first().map_or(0, |s| s.0);
    bounds.truncate(bounds.partition_point(|s| s.1.saturating_sub(a) <= MAX_RANGE));
    let ks = ks.start..ks.start + bounds.len();
    let &(_, b) = bounds.last()?;
    // Each span starts inside the one before (they share a byte when a seek point falls
    // inside one) and ends after it; anything else is a malformed index, which the
    // reader's own fetch will report.
    let contiguous = bounds
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[1].0 <= w[0].1 && w[0].1 <= w[1].1);
    if b <= a || !contiguous || bounds.iter().any(|(x, y)| y <= x) {
        return None;
    }
    Some((ks, bounds))
}

/// Stream bytes `[bounds[0].0, last end)` of the blob and cut them into the spans `bounds`,
/// each hashed as it arrives and sent to `tx` with whether it matched `want` (a byte two
/// spans share is copied into both). `false` when the source ignores ranges. Runs on the
/// runtime; each span is gathered once, into a pooled buffer of its size taken before its
/// bytes come.
pub(super) async fn stream_spans(
    src: std::sync::Arc<crate::source::Source>,
    desc: crate::manifest::Descriptor,
    bounds: Bounds,
    want: Vec<SpanDigest>,
    tx: tokio::sync::mpsc::Sender<BatchSpan>,
) -> Result<bool> {
    let (a, b) = (bounds[0].0, bounds[bounds.len() - 1].1);
    let Some(mut body) = src.range_stream(&desc, a, b).await? else {
        return Ok(false);
    };
    let mut i = 0;
    let mut pos = a;
    let mut buf = bufpool::take((bounds[0].1 - bounds[0].0) as usize);
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Io {
            context: format!("reading bytes {a}-{b} of {}", desc.digest),
            cause: e,
        })?;
        let mut c = &chunk[..];
        while !c.is_empty() && i < bounds.len() {
            // `buf` holds span i's bytes `[start, pos)`.
            let (sa, sb) = bounds[i];
            let take = c.len().min((sb - pos) as usize);
            hasher.update(&c[..take]);
            buf.extend_from_slice(&c[..take]);
            c = &c[take..];
            pos += take as u64;
            if pos < sb {
                continue;
            }
            let next = bounds.get(i + 1).map_or(0, |&(na, nb)| (nb - na) as usize);
            let span = bufpool::freeze(std::mem::replace(&mut buf, bufpool::take(next)));
            let good = SpanDigest::of_hasher(&hasher) == want[i];
            hasher.reset();
            if tx.send((i, good, span.clone())).await.is_err() {
                return Ok(true);
            }
            i += 1;
            if let Some(&(na, nb)) = bounds.get(i) {
                let shared = &span[(na - sa) as usize..];
                debug_assert!(buf.capacity() >= (nb - na) as usize);
                buf.extend_from_slice(shared);
                hasher.update(shared);
            }
        }
        if i == bounds.len() {
            break;
        }
    }
    Ok(true)
}
