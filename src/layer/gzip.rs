//! Random access into gzip streams (the zran technique from zlib's examples): while a layer is
//! decompressed once, record checkpoints at deflate block boundaries — the compressed offset
//! (down to the bit), the uncompressed offset, and the 32 KiB of output before it. From a
//! checkpoint, a raw inflater primed with those bits and that window decompresses onward, so
//! any byte range costs at most one span of decompression instead of the whole layer.
//!
//! Also the stored-block fast path ([`Stored`]): where deflate kept data verbatim, a read of a
//! local blob copies it out instead of inflating.
//!
//! Written on libz-rs-sys's zlib API because only that exposes what this needs
//! (`Z_BLOCK`, `inflatePrime`, `inflateSetDictionary`); flate2 hides them.

use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use libz_rs_sys as z;

use super::format::{Blob, Seekable, indexed};
use super::span::SpanHasher;
use crate::error::{IoContext, Result};
use crate::index::seek_points::{Checkpoint, SPAN, SeekPoints, checkpoint_before};
use crate::index::{self, LayerIndex};

const WINDOW: usize = 32 << 10;

pub(super) fn err(msg: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("gzip: {msg}"))
}

/// A raw-deflate inflater. Boxed: zlib's state points back at its stream, which must not move.
struct Inflater {
    strm: Box<z::z_stream>,
}

impl Inflater {
    fn raw() -> std::io::Result<Inflater> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised stream (zalloc/zfree set by Default),
        // the version string is zlib's own and the size is that of the struct we pass.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -15,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if rc != z::Z_OK {
            return Err(err(format!("cannot start an inflater ({rc})")));
        }
        Ok(Inflater { strm })
    }

    fn reset(&mut self) -> std::io::Result<()> {
        // SAFETY: the stream was initialised in `raw` and is still alive.
        match unsafe { z::inflateReset(&mut *self.strm) } {
            z::Z_OK => Ok(()),
            rc => Err(err(format!("inflateReset failed ({rc})"))),
        }
    }

    /// Resume at a checkpoint: feed it the partial byte's bits and the window.
    fn prime(&mut self, bits: u8, byte: u8, window: &[u8]) -> std::io::Result<()> {
        // SAFETY: initialised stream; `window` is a live slice of the given length.
        unsafe {
            if bits > 0 {
                let rc = z::inflatePrime(&mut *self.strm, bits as i32, (byte >> (8 - bits)) as i32);
                if rc != z::Z_OK {
                    return Err(err(format!("inflatePrime failed ({rc})")));
                }
            }
            if !window.is_empty() {
                let rc =
                    z::inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32);
                if rc != z::Z_OK {
                    return Err(err(format!("inflateSetDictionary failed ({rc})")));
                }
            }
        }
        Ok(())
    }

    /// Inflate from `input` into `output`; returns (consumed, produced, return code).
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (usize, usize, i32) {
        // SAFETY: `output` is a live slice of `output.len()` writable bytes.
        unsafe { self.inflate_raw(input, output.as_mut_ptr(), output.len(), flush) }
    }

    /// [`Inflater::inflate`] of at most `max` bytes into `out`'s spare capacity (which must
    /// not be empty), growing its length by what was produced: no zeroing of memory that is
    /// about to be written.
    fn inflate_into(&mut self, input: &[u8], out: &mut Vec<u8>, max: usize) -> (usize, usize, i32) {
        let room = (out.capacity() - out.len()).min(max);
        // SAFETY: `out.len()` is within the allocation and `room` bytes after it are spare
        // capacity; zlib writes there through a raw pointer (no reference to uninitialised
        // bytes exists), and initialises exactly the `produced` bytes `set_len` then covers.
        unsafe {
            let dest = out.as_mut_ptr().add(out.len());
            let r = self.inflate_raw(input, dest, room, z::Z_NO_FLUSH);
            out.set_len(out.len() + r.1);
            r
        }
    }

    /// One `inflate` call from `input` into `len` bytes at `dest`.
    ///
    /// # Safety
    /// `dest` must be valid for writes of `len` bytes.
    unsafe fn inflate_raw(
        &mut self,
        input: &[u8],
        dest: *mut u8,
        len: usize,
        flush: i32,
    ) -> (usize, usize, i32) {
        let s = &mut *self.strm;
        s.next_in = input.as_ptr();
        s.avail_in = input.len().min(u32::MAX as usize) as u32;
        s.next_out = dest;
        s.avail_out = len.min(u32::MAX as usize) as u32;
        let (ai, ao) = (s.avail_in, s.avail_out);
        // SAFETY: next_in points into a live slice, next_out is writable for `len` bytes (the
        // caller's promise), and avail_in/avail_out bound them.
        let rc = unsafe { z::inflate(s, flush) };
        let s = &mut *self.strm;
        let consumed = (ai - s.avail_in) as usize;
        let produced = (ao - s.avail_out) as usize;
        s.next_in = std::ptr::null();
        s.next_out = std::ptr::null_mut();
        (consumed, produced, rc)
    }

    /// zlib's `data_type` after the last call: bit 7 set at a block end, bit 6 in the last
    /// block, low 3 bits the unused bits of the last input byte.
    fn data_type(&self) -> i32 {
        self.strm.data_type
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in `raw`, ended exactly once here.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}

/// Skip a gzip member header (RFC 1952 §2.3); returns its length. Shared by every gzip
/// reader here ([`super::GzipMembers`] too).
pub(super) fn skip_header(r: &mut impl BufRead) -> std::io::Result<u64> {
    let mut n = 10u64;
    let mut h = [0u8; 10];
    r.read_exact(&mut h)?;
    if h[0] != 0x1f || h[1] != 0x8b || h[2] != 8 {
        return Err(err("not a gzip member header"));
    }
    let flags = h[3];
    if flags & 0x04 != 0 {
        let mut l = [0u8; 2];
        r.read_exact(&mut l)?;
        let len = u16::from_le_bytes(l) as u64;
        let skipped = std::io::copy(&mut r.take(len), &mut std::io::sink())?;
        if skipped != len {
            return Err(err("truncated header"));
        }
        n += 2 + len;
    }
    for bit in [0x08, 0x10] {
        if flags & bit != 0 {
            let mut s = Vec::new();
            n += r.read_until(0, &mut s)? as u64;
        }
    }
    if flags & 0x02 != 0 {
        r.read_exact(&mut [0u8; 2])?;
        n += 2;
    }
    Ok(n)
}

/// Is the rest of the stream empty or zero padding? Consumes the padding.
fn at_end(r: &mut impl BufRead, pos: &mut u64) -> std::io::Result<bool> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(true);
        }
        let zeros = buf.iter().take_while(|b| **b == 0).count();
        if zeros < buf.len() {
            if zeros > 0 {
                return Err(err("garbage after the last member"));
            }
            return Ok(false);
        }
        r.consume(zeros);
        *pos += zeros as u64;
    }
}

/// Decompresses a gzip stream (any number of members) as a `Read`, recording checkpoints
/// every [`SPAN`] bytes of output. Like [`super::GzipMembers`], it skips the CRC-32 and checks
/// the length in each trailer.
pub struct IndexingReader<R: BufRead> {
    src: SpanHasher<R>,
    inflater: Inflater,
    /// Compressed bytes consumed.
    in_pos: u64,
    /// Uncompressed bytes produced.
    out_pos: u64,
    in_member: bool,
    member_out: u32,
    finished: bool,
    ring: Vec<u8>,
    ring_next: usize,
    span: u64,
    pub checkpoints: Vec<Checkpoint>,
}

impl<R: BufRead> IndexingReader<R> {
    pub fn new(src: R) -> std::io::Result<IndexingReader<R>> {
        Self::with_span(src, SPAN)
    }

    pub fn with_span(src: R, span: u64) -> std::io::Result<IndexingReader<R>> {
        Ok(IndexingReader {
            src: SpanHasher::new(src),
            inflater: Inflater::raw()?,
            in_pos: 0,
            out_pos: 0,
            in_member: false,
            member_out: 0,
            finished: false,
            ring: Vec::with_capacity(WINDOW),
            ring_next: 0,
            span: span.max(1),
            checkpoints: Vec::new(),
        })
    }

    /// Keep the last 32 KiB of output in a ring (oldest byte at `ring_next` once full).
    fn remember(&mut self, out: &[u8]) {
        let mut tail = &out[out.len().saturating_sub(WINDOW)..];
        if self.ring.len() < WINDOW {
            let take = (WINDOW - self.ring.len()).min(tail.len());
            self.ring.extend_from_slice(&tail[..take]);
            tail = &tail[take..];
        }
        if tail.is_empty() {
            return;
        }
        let first = (WINDOW - self.ring_next).min(tail.len());
        self.ring[self.ring_next..self.ring_next + first].copy_from_slice(&tail[..first]);
        let rest = &tail[first..];
        self.ring[..rest.len()].copy_from_slice(rest);
        self.ring_next = (self.ring_next + tail.len()) % WINDOW;
    }

    /// The last 32 KiB of output, oldest first.
    fn window(&self) -> Vec<u8> {
        if self.ring.len() < WINDOW {
            return self.ring.clone();
        }
        let mut w = Vec::with_capacity(WINDOW);
        w.extend_from_slice(&self.ring[self.ring_next..]);
        w.extend_from_slice(&self.ring[..self.ring_next]);
        w
    }

    /// The checkpoints and span digests; call after reading to the end.
    pub fn seek_points(self) -> SeekPoints {
        self.src.into_seek_points(self.checkpoints)
    }

    fn due(&self) -> bool {
        self.checkpoints
            .last()
            .is_none_or(|c| self.out_pos - c.out_offset >= self.span)
    }

    /// Begin the next member, or finish; returns false at the end of the stream.
    fn start_member(&mut self) -> std::io::Result<bool> {
        if at_end(&mut self.src, &mut self.in_pos)? {
            return Ok(false);
        }
        self.in_pos += skip_header(&mut self.src)?;
        self.inflater.reset()?;
        self.in_member = true;
        self.member_out = 0;
        self.ring.clear();
        self.ring_next = 0;
        if self.due() {
            // A member starts with no history: no window, no partial byte.
            self.src.cut(false);
            self.checkpoints.push(Checkpoint {
                in_offset: self.in_pos,
                bits: 0,
                out_offset: self.out_pos,
                window: Vec::new(),
            });
        }
        Ok(true)
    }
}

impl<R: BufRead> Read for IndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || self.finished {
            return Ok(0);
        }
        loop {
            if !self.in_member && !self.start_member()? {
                self.finished = true;
                return Ok(0);
            }
            let input = self.src.fill_buf()?;
            if input.is_empty() {
                return Err(err("stream truncated inside a member"));
            }
            let (used, produced, rc) = self.inflater.inflate(input, buf, z::Z_BLOCK);
            self.src.consume(used);
            self.in_pos += used as u64;
            self.out_pos += produced as u64;
            self.member_out = self.member_out.wrapping_add(produced as u32);
            self.remember(&buf[..produced]);
            match rc {
                z::Z_OK | z::Z_BUF_ERROR => {
                    let dt = self.inflater.data_type();
                    if dt & 128 != 0 && dt & 64 == 0 && self.due() {
                        self.src.cut(dt & 7 != 0);
                        self.checkpoints.push(Checkpoint {
                            in_offset: self.in_pos,
                            bits: (dt & 7) as u8,
                            out_offset: self.out_pos,
                            window: self.window(),
                        });
                    }
                    if rc == z::Z_BUF_ERROR && used == 0 && produced == 0 {
                        return Err(err("inflate made no progress"));
                    }
                }
                z::Z_STREAM_END => {
                    let mut trailer = [0u8; 8];
                    self.src
                        .read_exact(&mut trailer)
                        .map_err(|_| err("stream truncated (no member trailer)"))?;
                    self.in_pos += 8;
                    if u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"))
                        != self.member_out
                    {
                        return Err(err("member length does not match its trailer"));
                    }
                    self.in_member = false;
                }
                rc => return Err(err(format!("corrupt deflate data ({rc})"))),
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

/// gzip as a [`Seekable`] format (zran checkpoints; stored blocks are the view's fast path
/// for local blobs, see [`Stored`]).
pub struct Gzip;

impl Seekable for Gzip {
    fn index(&self, blob: Box<dyn BufRead + Send>, limits: index::Limits) -> Result<LayerIndex> {
        indexed(
            IndexingReader::new(blob).ctx(|| "starting to decompress".into())?,
            IndexingReader::seek_points,
            limits,
        )
    }

    fn read_at(
        &self,
        mut blob: &mut dyn Blob,
        checkpoints: &[Checkpoint],
        start: u64,
        len: usize,
        out: Vec<u8>,
    ) -> std::io::Result<Vec<u8>> {
        read_at(&mut blob, checkpoints, start, len, out)
    }
}

/// Read `len` uncompressed bytes from `start` out of the gzip `blob`, decompressing from the
/// last checkpoint at or before `start`, into `out` (emptied first; its capacity is used).
/// Fewer bytes come back only at the end of the stream.
pub fn read_at(
    blob: &mut (impl BufRead + Seek),
    checkpoints: &[Checkpoint],
    start: u64,
    len: usize,
    mut out: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    out.clear();
    let cp = checkpoint_before(checkpoints, start)?;
    let back = u64::from(cp.bits > 0);
    let from = cp
        .in_offset
        .checked_sub(back)
        .ok_or_else(|| err("checkpoint offset out of range"))?;
    blob.seek(SeekFrom::Start(from))?;
    let mut src = blob;
    let mut inflater = Inflater::raw()?;
    let mut partial = [0u8; 1];
    if back == 1 {
        src.read_exact(&mut partial)?;
    }
    inflater.prime(cp.bits, partial[0], &cp.window)?;

    // Output before `start` goes to a scratch buffer and is dropped; from `start` on it is
    // inflated straight into `out` (no second copy). `len` may be "to the end"
    // (usize::MAX): `out` grows a span at a time, not to what was asked.
    let mut pos = cp.out_offset;
    let mut scratch = Vec::new();
    let mut in_member = true;
    let mut pos_in = from + back;
    while out.len() < len {
        if !in_member {
            if at_end(&mut src, &mut pos_in)? {
                break;
            }
            pos_in += skip_header(&mut src)?;
            inflater.reset()?;
            in_member = true;
        }
        let input = src.fill_buf()?;
        if input.is_empty() {
            return Err(err("stream truncated inside a member"));
        }
        let (used, produced, rc) = if pos < start {
            if scratch.is_empty() {
                scratch = vec![0u8; 256 << 10];
            }
            let room = scratch.len().min((start - pos) as usize);
            inflater.inflate(input, &mut scratch[..room], z::Z_NO_FLUSH)
        } else {
            if out.len() == out.capacity() {
                out.reserve_exact((len - out.len()).min(2 * SPAN as usize));
            }
            let max = len - out.len();
            inflater.inflate_into(input, &mut out, max)
        };
        src.consume(used);
        pos_in += used as u64;
        pos += produced as u64;
        match rc {
            z::Z_OK => {}
            z::Z_BUF_ERROR if used > 0 || produced > 0 => {}
            z::Z_STREAM_END => {
                let mut trailer = [0u8; 8];
                src.read_exact(&mut trailer)
                    .map_err(|_| err("stream truncated (no member trailer)"))?;
                pos_in += 8;
                in_member = false;
            }
            rc => return Err(err(format!("corrupt deflate data ({rc})"))),
        }
    }
    Ok(out)
}

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
    out_start: u64,
    /// Blob offset of the first block's data.
    first_in: u64,
    /// Where each block's data ends, relative to `out_start`. Every block after the first
    /// starts byte-aligned (a stored block ends so), so its header is exactly 5 bytes: block
    /// `i`'s data is at `first_in + ends[i - 1] + 5 * i`. `u32` is enough: at most
    /// [`MAX_STORED_BLOCKS`] blocks of at most 64 KiB each.
    ends: Vec<u32>,
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
        while done < len {
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(1024);
            let mut file_at = None;
            let mut want = 0usize;
            while done + want < len && iov.len() + 2 <= 1024 {
                let b_start = if i == 0 { 0 } else { self.end(i - 1) };
                let b_end = self.end(i);
                let from = (rel + (done + want) as u64).max(b_start);
                let take = ((b_end - from) as usize).min(len - done - want);
                if file_at.is_none() {
                    file_at = Some(self.first_in + from + 5 * i as u64);
                } else {
                    iov.push(libc::iovec {
                        iov_base: header.as_mut_ptr().cast(),
                        iov_len: 5,
                    });
                }
                if take > 0 {
                    iov.push(libc::iovec {
                        // SAFETY: `done + want + take <= len`, within the reserved capacity.
                        iov_base: unsafe { dest.add(done + want) }.cast(),
                        iov_len: take,
                    });
                }
                want += take;
                i += 1;
            }
            let file_at = file_at.expect("covers() promised a block");
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
                // SAFETY: every iovec points at writable memory of its length: the spare
                // capacity reserved above or `header`; `blob` is an open file.
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
            done += want;
        }
        // SAFETY: preadv filled all `len` bytes after `base` (the loop ends only then).
        unsafe { out.set_len(base + len) };
        Ok(())
    }
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

#[cfg(test)]
mod tests;
