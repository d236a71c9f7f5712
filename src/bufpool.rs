//! Reused buffers for the span-sized byte runs a read by range moves: compressed spans as
//! they arrive, spans loaded from the chunk store, decompressed pieces.
//!
//! Why not plain allocations: each would be a fresh 4 MiB that glibc, after the first one
//! is freed, takes from its heap rather than mapping, and a sequential read interleaves
//! them with small allocations until the daemon's heap is fragmented far past what it holds.
//! Mapping each one instead costs a page fault per 4 KiB every time. A few buffers kept for
//! reuse avoid both: pooling fetched and loaded spans (pieces were pooled already) took the
//! daemon's peak after a 256 MiB read by range from 124-142 MB to 107-119 MB, by hand on
//! the bench machine (the single malloc arena of `cli::mount::before_threads` did the rest).

use std::sync::Mutex;

use crate::index::seek_points::SPAN;

/// The capacity of every pooled buffer: a 4 MiB span with room for its tail (a piece with
/// its span's short tail, or a compressed span of data deflate could not shrink).
pub const CAP: usize = (SPAN + SPAN / 4) as usize;
/// Buffers kept for reuse beyond those in use. Two: every buffer kept is 5 MiB of daemon RSS
/// on top of the cached pieces, and the daemon maps span-sized buffers of its own (see
/// `cli::mount::before_threads`), so one that is not kept goes back to the system whole
/// instead of leaving a hole in the heap.
const KEPT: usize = 2;

static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer for `len` bytes: a pooled one when `len` is span-sized (at least half a
/// span, at most [`CAP`]), else a plain one.
pub fn take(len: usize) -> Vec<u8> {
    if len < SPAN as usize / 2 || len > CAP {
        return Vec::with_capacity(len);
    }
    let spare = SPARE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop();
    let mut buf = spare.unwrap_or_else(fresh);
    buf.clear();
    buf
}

/// A new pooled buffer. It is mapped on its own (`cli::mount::before_threads` sets the mmap
/// threshold at `CAP`), and asked for in huge pages: first touching 5 MiB in 4 KiB pages is
/// 1,280 page faults, which a read by range pays for every buffer the pool did not keep.
fn fresh() -> Vec<u8> {
    let buf = Vec::<u8>::with_capacity(CAP);
    const HUGE: usize = 2 << 20;
    let at = buf.as_ptr() as usize;
    let start = at.next_multiple_of(HUGE);
    let end = (at + CAP) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside the allocation `buf` owns; MADV_HUGEPAGE is advice
        // only: it changes neither the contents nor the validity of the mapping.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    buf
}

/// Bytes whose buffer goes back to the pool when the last reader drops them (made with
/// `bytes::Bytes::from_owner`).
pub struct Pooled(pub Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.0.capacity() == CAP {
            let mut spare = SPARE
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if spare.len() < KEPT {
                let mut buf = std::mem::take(&mut self.0);
                buf.clear();
                spare.push(buf);
            }
        }
    }
}

/// `bytes` as [`bytes::Bytes`] that return their buffer to the pool.
pub fn freeze(bytes: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from_owner(Pooled(bytes))
}

#[cfg(test)]
pub(crate) fn put_dirty(buf: Vec<u8>) {
    SPARE.lock().unwrap().push(buf);
}
