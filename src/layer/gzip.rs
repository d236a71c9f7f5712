//! Random access into gzip streams (the zran technique from zlib's examples): while a layer is
//! decompressed once, record checkpoints at deflate block boundaries — the compressed offset
//! (down to the bit), the uncompressed offset, and the 32 KiB of output before it. From a
//! checkpoint, a raw inflater primed with those bits and that window decompresses onward, so
//! any byte range costs at most one span of decompression instead of the whole layer.
//!
//! Also the stored-block fast path ([`Stored`], `gzip/stored.rs`): where deflate kept data
//! verbatim, a read of a local blob copies it out instead of inflating.
//!
//! Written on libz-rs-sys's zlib API because only that exposes what this needs
//! (`Z_BLOCK`, `inflatePrime`, `inflateSetDictionary`); flate2 hides them. The unsafe calls
//! into it are kept to `gzip/inflater.rs`.

use std::io::{BufRead, Read, Seek, SeekFrom};

use libz_rs_sys as z;

use super::format::{Blob, Seekable, indexed};
use super::span::SpanHasher;
use crate::error::{IoContext, Result};
use crate::index::seek_points::{Checkpoint, SPAN, SeekPoints, checkpoint_before};
use crate::index::{self, LayerIndex};

mod inflater;
mod stored;

use inflater::Inflater;
pub use stored::Stored;

const WINDOW: usize = 32 << 10;

pub(super) fn err(msg: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("gzip: {msg}"))
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
    fn index(
        &self,
        blob: Box<dyn BufRead + Send>,
        limits: index::Limits,
        span: u64,
    ) -> Result<LayerIndex> {
        indexed(
            IndexingReader::with_span(blob, span).ctx(|| "starting to decompress".into())?,
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

#[cfg(test)]
mod tests;
