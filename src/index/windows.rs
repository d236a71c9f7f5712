//! Seek-point windows kept apart from a published index. A gzip layer's index is mostly its
//! 32 KiB windows (one per span: 15.7 of 17.6 MB for the bench userland's five indexes), and
//! a window is needed only when its span is first decompressed. So a published index can
//! be *slim*: each window replaced by its BLAKE3 digest (codec `SLIM_VERSION`), the windows
//! themselves in a second blob, one [`WINDOW`]-byte slot each, read by range beside the span
//! that needs one and checked against its digest.
//!
//! A window shorter than 32 KiB (the start of a gzip member's output) fills its slot
//! right-aligned, zeros before it: a deflate stream never refers back past its member's
//! start, so the zeros are never read, and every slot has the same size and place.

use std::sync::Arc;

use super::{LayerIndex, SeekPoints};
use crate::digest::{Digest, SpanDigest};
use crate::error::{Error, Result};

/// Bytes of one window's slot in a windows blob: deflate's history.
pub const WINDOW: usize = 32 << 10;

/// Where the windows of an index that came without them are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowsApart {
    /// The windows blob.
    pub blob: Digest,
    pub blob_size: u64,
    /// Per checkpoint: its window's slot in the blob and the slot's digest, or `None` for
    /// a checkpoint without a window (a member's start).
    pub slots: Vec<Option<(u32, SpanDigest)>>,
}

impl WindowsApart {
    /// The bytes of the blob that slot `slot` is.
    pub fn slot_range(slot: u32) -> (u64, u64) {
        let a = u64::from(slot) * WINDOW as u64;
        (a, a + WINDOW as u64)
    }
}

/// `window` in its slot: right-aligned in [`WINDOW`] bytes.
pub fn slot_bytes(window: &[u8]) -> Vec<u8> {
    let mut slot = vec![0; WINDOW - window.len().min(WINDOW)];
    slot.extend_from_slice(&window[window.len().saturating_sub(WINDOW)..]);
    slot
}

/// The slim form of `index` (its windows replaced by their slots' digests, for
/// `codec::encode_slim`) and its windows blob; `None` when it has no window to move (a
/// zstd or plain layer, or no seek points).
pub fn slim(index: &LayerIndex) -> Option<(LayerIndex, Vec<u8>)> {
    let sp = index.seek.as_ref()?;
    if sp.checkpoints.iter().all(|c| c.window.is_empty()) {
        return None;
    }
    let mut blob = Vec::new();
    let mut checkpoints = sp.checkpoints.clone();
    for c in checkpoints.iter_mut().filter(|c| !c.window.is_empty()) {
        let slot = slot_bytes(&c.window);
        c.window = SpanDigest::of(&slot).0.to_vec();
        blob.extend_from_slice(&slot);
    }
    let slim = LayerIndex {
        entries: index.entries.clone(),
        seek: Some(SeekPoints {
            checkpoints,
            span_digests: sp.span_digests.clone(),
            windows_apart: None,
        }),
    };
    Some((slim, blob))
}

/// A decoded slim index made usable: each window digest taken out of its checkpoint (left
/// empty) into the [`WindowsApart`] of `blob` (`blob_size` bytes), which must be the blob
/// the index is pinned to (`pinned`) and have a slot for each.
pub fn take_apart(
    (mut index, pinned): (LayerIndex, Digest),
    blob: Digest,
    blob_size: u64,
) -> Result<LayerIndex> {
    let bad = |reason: String| Error::malformed("slim layer index", reason);
    if pinned != blob {
        return Err(bad(format!(
            "its windows are in {pinned}, not in the windows blob {blob} offered with it"
        )));
    }
    let sp = index
        .seek
        .as_mut()
        .ok_or_else(|| bad("it has no seek points".into()))?;
    let mut slots = Vec::with_capacity(sp.checkpoints.len());
    let mut next = 0u32;
    for c in &mut sp.checkpoints {
        match c.window.len() {
            0 => slots.push(None),
            32 => {
                let digest = SpanDigest(c.window[..].try_into().expect("32 bytes"));
                slots.push(Some((next, digest)));
                next += 1;
                c.window = Vec::new();
            }
            n => return Err(bad(format!("a window digest of {n} bytes"))),
        }
    }
    if u64::from(next) * WINDOW as u64 != blob_size {
        return Err(bad(format!(
            "{next} windows, but the windows blob {blob} is {blob_size} bytes"
        )));
    }
    sp.windows_apart = Some(Arc::new(WindowsApart {
        blob,
        blob_size,
        slots,
    }));
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::seek_points::Checkpoint;

    fn cp(out_offset: u64, window: Vec<u8>) -> Checkpoint {
        Checkpoint {
            in_offset: out_offset / 4 + 1,
            bits: 0,
            out_offset,
            window,
        }
    }

    #[test]
    fn a_slim_index_round_trips_to_slots_holding_each_window() {
        let windows = [
            Vec::new(),
            vec![1u8; WINDOW],
            vec![2u8; 100],
            vec![3u8; WINDOW],
        ];
        let index = LayerIndex {
            entries: Vec::new(),
            seek: Some(SeekPoints {
                checkpoints: windows
                    .iter()
                    .enumerate()
                    .map(|(i, w)| cp(i as u64 * 1000, w.clone()))
                    .collect(),
                span_digests: (0..4u8).map(|i| SpanDigest::of(&[i])).collect(),
                windows_apart: None,
            }),
        };
        let layer = Digest::of(b"layer");
        let (slim_index, blob) = slim(&index).unwrap();
        assert_eq!(blob.len(), 3 * WINDOW);
        let blob_digest = Digest::of(&blob);
        let bytes = crate::index::codec::encode_slim(&layer, &slim_index, &blob_digest);
        assert!(
            crate::index::codec::decode(&layer, &bytes).is_err(),
            "a slim index is never read as a full one"
        );
        let decoded = crate::index::codec::decode_slim(&layer, &bytes).unwrap();
        let apart = take_apart(decoded, blob_digest, blob.len() as u64).unwrap();
        let sp = apart.seek.unwrap();
        assert!(sp.checkpoints.iter().all(|c| c.window.is_empty()));
        let wa = sp.windows_apart.unwrap();
        assert_eq!(wa.slots[0], None);
        for (k, w) in windows.iter().enumerate().skip(1) {
            let (slot, digest) = wa.slots[k].unwrap();
            let (a, b) = WindowsApart::slot_range(slot);
            let bytes = &blob[a as usize..b as usize];
            assert_eq!(SpanDigest::of(bytes), digest);
            assert!(bytes.ends_with(w), "window {k} ends its slot");
        }
        // A zstd layer's seek points have no windows: nothing to move.
        let mut none = index.clone();
        for c in &mut none.seek.as_mut().unwrap().checkpoints {
            c.window.clear();
        }
        assert!(slim(&none).is_none());
    }

    #[test]
    fn a_windows_blob_of_the_wrong_size_or_a_bad_digest_is_refused() {
        let index = LayerIndex {
            entries: Vec::new(),
            seek: Some(SeekPoints {
                checkpoints: vec![cp(0, Vec::new()), cp(1000, vec![9; 40])],
                span_digests: vec![SpanDigest::of(b"a"), SpanDigest::of(b"b")],
                windows_apart: None,
            }),
        };
        let (slim_index, blob) = slim(&index).unwrap();
        let d = Digest::of(&blob);
        let pinned = |i: &LayerIndex| (i.clone(), d.clone());
        let size = blob.len() as u64;
        assert!(take_apart(pinned(&slim_index), d.clone(), size - 1).is_err());
        // A full index's window where a digest belongs.
        assert!(take_apart(pinned(&index), d.clone(), size).is_err());
        // Another windows blob than the one the index is pinned to.
        let other = Digest::of(b"other windows");
        let e = take_apart(pinned(&slim_index), other, size).unwrap_err();
        assert!(e.to_string().contains("not in the windows blob"), "{e}");
        assert!(take_apart(pinned(&slim_index), d, size).is_ok());
    }
}
