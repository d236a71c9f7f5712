//! The stored-block fast path: runs of deflate stored blocks found by walking the block
//! headers from a checkpoint, and copied straight out of a local blob with `preadv` instead
//! of being inflated.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::index::seek_points::Checkpoint;

/// Where deflate kept a run of output verbatim: stored blocks (RFC 1951 §3.2.4), the bytes
/// themselves after a 5-byte header, which is what compressors emit for data they cannot
/// shrink (media, archives, already-compressed files). A read inside such a run copies the
/// bytes straight out of the blob instead of inflating them: one pass over them fewer.
///
/// Found at read time by walking the block headers from a checkpoint, which always sits on
/// a block boundary; the index format is unchanged.
#[derive(Debug, PartialEq, Eq)]
pub struct Stored {
    /// Uncompressed offset of the first block's data (the checkpoint's).
    pub(super) out_start: u64,
    /// Blob offset of the first block's data.
    pub(super) first_in: u64,
    /// Where each block's data ends, relative to `out_start`. Every block after the first
    /// starts byte-aligned (a stored block ends so), so its header is exactly 5 bytes: block
    /// `i`'s data is at `first_in + ends[i - 1] + 5 * i`. `u32` is enough: at most
    /// [`MAX_STORED_BLOCKS`] blocks of at most 64 KiB each.
    pub(super) ends: Vec<u32>,
}

/// At most this many blocks are walked from one checkpoint (a span of 4 MiB holds 64 to
/// 256 of them; more means something else is going on).
const MAX_STORED_BLOCKS: usize = 1 << 14;
// Block ends relative to the run fit `Stored::ends`' u32.
const _: () = assert!(MAX_STORED_BLOCKS as u64 * u16::MAX as u64 <= u32::MAX as u64);

impl Stored {
    /// Walk the stored blocks from checkpoint `cp` until uncompressed offset `end`, the first
    /// compressed block, or the end of the gzip member. None when the first block is not
    /// stored. Damage (a length that does not match its complement, a blob that ends early)
    /// only ends the walk: inflating those bytes reports it.
    pub fn walk(blob: &impl FileExt, cp: &Checkpoint, end: u64) -> std::io::Result<Option<Stored>> {
        let Some(mut bitpos) = (cp.in_offset * 8).checked_sub(u64::from(cp.bits)) else {
            return Ok(None);
        };
        let mut out = cp.out_offset;
        let mut first_in = None;
        let mut ends = Vec::new();
        let mut hdr = [0u8; 6];
        while out < end && ends.len() < MAX_STORED_BLOCKS {
            let at = bitpos / 8;
            let shift = (bitpos % 8) as u32;
            // The 3 header bits (possibly across two bytes), padding to a byte boundary,
            // then LEN and NLEN: at most 6 bytes from `at`.
            let got = read_full(blob, &mut hdr, at)?;
            if got < 2 {
                break;
            }
            let bits = (u16::from_le_bytes([hdr[0], hdr[1]]) >> shift) & 7;
            let (last, btype) = (bits & 1 == 1, bits >> 1);
            let len_at = (bitpos + 3).div_ceil(8) - at;
            if btype != 0 || got < len_at as usize + 4 {
                break;
            }
            let l = len_at as usize;
            let len = u16::from_le_bytes([hdr[l], hdr[l + 1]]);
            if len != !u16::from_le_bytes([hdr[l + 2], hdr[l + 3]]) {
                break;
            }
            let data = at + len_at + 4;
            let first = *first_in.get_or_insert(data);
            debug_assert_eq!(
                data,
                first + u64::from(ends.last().copied().unwrap_or(0)) + 5 * ends.len() as u64
            );
            out += u64::from(len);
            ends.push((out - cp.out_offset) as u32);
            bitpos = (data + u64::from(len)) * 8;
            if last {
                break;
            }
        }
        Ok(first_in.map(|first_in| Stored {
            out_start: cp.out_offset,
            first_in,
            ends,
        }))
    }

    /// The end of the uncompressed bytes the run holds.
    pub fn out_end(&self) -> u64 {
        self.out_start + self.ends.last().map_or(0, |&e| u64::from(e))
    }

    /// The end of block `i`'s data, relative to `out_start`.
    fn end(&self, i: usize) -> u64 {
        u64::from(self.ends[i])
    }

    /// Does the run hold uncompressed `[start, start + len)`?
    pub fn covers(&self, start: u64, len: u64) -> bool {
        start >= self.out_start && start.saturating_add(len) <= self.out_end()
    }

    /// Append uncompressed `[start, start + len)`, which the run must cover, to `out`, read
    /// from `blob` with one `preadv` per 512 blocks: the data lands in `out`, each header
    /// between blocks in a scratch buffer.
    pub fn copy_out(
        &self,
        blob: &File,
        start: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if !self.covers(start, len as u64) {
            return Err(std::io::Error::other("read outside the stored run"));
        }
        let mut header = [0u8; 5];
        out.reserve(len);
        let base = out.len();
        let dest = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        let rel = start - self.out_start;
        // The block holding `start`: the first whose data ends after it.
        let mut i = self.ends.partition_point(|&e| u64::from(e) <= rel);
        let mut done = 0usize;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_IOV);
        while done < len {
            iov.clear();
            let (file_at, want) = self.batch(
                &mut i,
                rel + done as u64,
                len - done,
                dest.wrapping_add(done),
                header.as_mut_ptr(),
                &mut iov,
            );
            // SAFETY: every iovec points at writable memory of its length: `header`, or the
            // spare capacity reserved above (`batch` stays within the `len - done` bytes
            // after `dest + done`); `blob` is an open file.
            unsafe { preadv_all(blob, &iov, file_at)? };
            done += want;
        }
        // SAFETY: preadv filled all `len` bytes after `base` (the loop ends only then).
        unsafe { out.set_len(base + len) };
        Ok(())
    }

    /// The iovecs of one `preadv`, from block `*i` on (advanced past the blocks taken): the
    /// data of uncompressed `[at, at + left)` to `dest` onward, as much of it as
    /// [`MAX_IOV`] iovecs reach, each 5-byte block header between into `header`. Returns
    /// where in the blob the read starts and how many data bytes it brings.
    fn batch(
        &self,
        i: &mut usize,
        at: u64,
        left: usize,
        dest: *mut u8,
        header: *mut u8,
        iov: &mut Vec<libc::iovec>,
    ) -> (u64, usize) {
        let mut file_at = None;
        let mut want = 0usize;
        while want < left && iov.len() + 2 <= MAX_IOV {
            let b_start = if *i == 0 { 0 } else { self.end(*i - 1) };
            let b_end = self.end(*i);
            let from = (at + want as u64).max(b_start);
            let take = ((b_end - from) as usize).min(left - want);
            if file_at.is_none() {
                file_at = Some(self.first_in + from + 5 * *i as u64);
            } else {
                iov.push(libc::iovec {
                    iov_base: header.cast(),
                    iov_len: 5,
                });
            }
            if take > 0 {
                iov.push(libc::iovec {
                    iov_base: dest.wrapping_add(want).cast(),
                    iov_len: take,
                });
            }
            want += take;
            *i += 1;
        }
        (file_at.expect("covers() promised a block"), want)
    }
}

/// The most iovecs one `preadv` is given (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// `preadv` of all the bytes `iov` describes, from blob offset `file_at`, resuming after a
/// short read.
///
/// # Safety
/// Every iovec must point at memory valid for writes of its length.
unsafe fn preadv_all(blob: &File, iov: &[libc::iovec], file_at: u64) -> std::io::Result<()> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut got = 0usize;
    while got < total {
        // Unlikely on a file in the page cache, but a short read resumes where it
        // stopped: skip the iovecs (or parts) already filled.
        let (mut skip, mut k) = (got, 0);
        while skip >= iov[k].iov_len {
            skip -= iov[k].iov_len;
            k += 1;
        }
        let mut rest = iov[k..].to_vec();
        // SAFETY: `skip < iov_len` of that iovec, so the pointer stays inside it.
        rest[0].iov_base = unsafe { rest[0].iov_base.cast::<u8>().add(skip) }.cast();
        rest[0].iov_len -= skip;
        // SAFETY: every iovec points at writable memory of its length (the caller's
        // promise); `blob` is an open file.
        let n = unsafe {
            libc::preadv(
                std::os::fd::AsRawFd::as_raw_fd(blob),
                rest.as_ptr(),
                rest.len() as i32,
                (file_at + got as u64) as libc::off_t,
            )
        };
        match n {
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob ends inside a stored block",
                ));
            }
            n => got += n as usize,
        }
    }
    Ok(())
}

/// `pread` until `buf` is full or the file ends; how many bytes were read.
fn read_full(f: &impl FileExt, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
