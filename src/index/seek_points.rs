//! Seek points: where a layer's compressed stream can be resumed (a checkpoint per span of
//! output), and the digest of each span's compressed bytes. Format-neutral — gzip, zstd and
//! plain layers record the same shape — and part of a layer's index, so it lives beside it:
//! `layer` makes them, `view` reads by them, `index::codec` stores them.

use serde::{Deserialize, Serialize};

use crate::digest::SpanDigest;

/// Uncompressed bytes between checkpoints: a read decompresses at most this much extra.
pub const SPAN: u64 = 4 << 20;

/// A place to resume decompression.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the compressed blob of the first byte the inflater has not used up.
    pub in_offset: u64,
    /// How many bits of the byte before `in_offset` belong to what follows (0–7).
    pub bits: u8,
    /// Offset in the uncompressed stream.
    pub out_offset: u64,
    /// The output just before `out_offset` (up to 32 KiB; empty at the start of a member).
    /// As bytes, not a sequence: the same bytes in postcard, decoded in one copy instead of
    /// one call per byte (that was a third of a `cat`'s CPU on the bench image).
    #[serde(with = "serde_bytes")]
    pub window: Vec<u8>,
}

/// What indexing a layer records besides the tar entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeekPoints {
    pub checkpoints: Vec<Checkpoint>,
    /// BLAKE3 of the compressed bytes each checkpoint's span reads: from the checkpoint (one
    /// byte earlier when it sits mid-byte) to the next checkpoint's `in_offset`, the last one
    /// to the end of the blob. Range reads check what they fetch against these.
    pub span_digests: Vec<SpanDigest>,
    /// Set when the index came without its windows (a published slim index,
    /// `index::windows`): every checkpoint's `window` is then empty, and the one a span
    /// needs is read from the blob this names. Never stored: the codec writes windows in.
    #[serde(skip)]
    pub windows_apart: Option<std::sync::Arc<super::windows::WindowsApart>>,
}

impl SeekPoints {
    /// The compressed bytes `[start, end)` that span `k` reads: what `span_digests[k]`
    /// covers. `blob_size` ends the last span.
    pub fn span_range(&self, k: usize, blob_size: u64) -> (u64, u64) {
        let cp = &self.checkpoints[k];
        // Saturating: a checkpoint at 0 with bits is malformed; its span then fails its digest.
        let start = cp.in_offset.saturating_sub(u64::from(cp.bits > 0));
        let end = self
            .checkpoints
            .get(k + 1)
            .map_or(blob_size, |next| next.in_offset);
        (start, end)
    }

    /// The uncompressed bytes span `k` yields: `[out_offset, next out_offset)`, or to the
    /// end of the stream for the last span.
    pub fn span_output(&self, k: usize) -> (u64, Option<u64>) {
        (
            self.checkpoints[k].out_offset,
            self.checkpoints.get(k + 1).map(|c| c.out_offset),
        )
    }

    /// The index of the span holding uncompressed offset `pos`.
    pub fn span_at(&self, pos: u64) -> Option<usize> {
        self.checkpoints
            .partition_point(|c| c.out_offset <= pos)
            .checked_sub(1)
    }
}

/// The last seek point at or before uncompressed offset `start`.
pub fn checkpoint_before(checkpoints: &[Checkpoint], start: u64) -> std::io::Result<&Checkpoint> {
    let i = checkpoints.partition_point(|c| c.out_offset <= start);
    checkpoints.get(i.wrapping_sub(1)).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no seek point before the requested offset",
        )
    })
}
