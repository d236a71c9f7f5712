//! Random access into zstd layers at frame boundaries. A zstd frame decodes on its own, so
//! the start of a frame is a seek point with no window; layers written as many frames
//! (zstd:chunked, or any multi-frame writer) become readable anywhere for the cost of one
//! frame. A single-frame layer gets one seek point at its start.

use std::io::{BufRead, Read, Seek, SeekFrom};

use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer, ResetDirective};

use super::format::{Blob, Seekable, indexed};
use super::gzip::err;
use super::span::SpanHasher;
use crate::index::seek_points::{Checkpoint, SPAN, SeekPoints, checkpoint_before};
use crate::index::{self, LayerIndex};

fn zerr(code: usize) -> std::io::Error {
    err(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

/// Decompresses a zstd stream (any number of frames) as a `Read`, recording a seek point at
/// each frame start at least a span (by default [`SPAN`]) of output after the previous one.
pub struct ZstdIndexingReader<R: BufRead> {
    src: SpanHasher<R>,
    dctx: DCtx<'static>,
    in_pos: u64,
    out_pos: u64,
    /// Between frames: the next byte starts a frame.
    at_frame_start: bool,
    checkpoints: Vec<Checkpoint>,
    span: u64,
}

impl<R: BufRead> ZstdIndexingReader<R> {
    pub fn new(src: R) -> ZstdIndexingReader<R> {
        Self::with_span(src, SPAN)
    }

    pub fn with_span(src: R, span: u64) -> ZstdIndexingReader<R> {
        ZstdIndexingReader {
            src: SpanHasher::new(src),
            dctx: DCtx::create(),
            in_pos: 0,
            out_pos: 0,
            at_frame_start: true,
            checkpoints: Vec::new(),
            span: span.max(1),
        }
    }

    pub fn seek_points(self) -> SeekPoints {
        self.src.into_seek_points(self.checkpoints)
    }
}

impl<R: BufRead> Read for ZstdIndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let input = self.src.fill_buf()?;
            if input.is_empty() {
                if self.at_frame_start {
                    return Ok(0);
                }
                return Err(err("zstd stream truncated inside a frame"));
            }
            if self.at_frame_start {
                let due = self
                    .checkpoints
                    .last()
                    .is_none_or(|c| self.out_pos - c.out_offset >= self.span);
                if due {
                    self.src.cut(false);
                    self.checkpoints.push(Checkpoint {
                        in_offset: self.in_pos,
                        bits: 0,
                        out_offset: self.out_pos,
                        window: Vec::new(),
                    });
                }
                self.at_frame_start = false;
            }
            let input = self.src.fill_buf()?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut *buf);
            let hint = self
                .dctx
                .decompress_stream(&mut outb, &mut inb)
                .map_err(zerr)?;
            let (used, produced) = (inb.pos(), outb.pos());
            self.src.consume(used);
            self.in_pos += used as u64;
            self.out_pos += produced as u64;
            if hint == 0 {
                // Frame complete; the next byte (if any) starts another.
                self.at_frame_start = true;
                self.dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
            }
            if produced > 0 {
                return Ok(produced);
            }
            if used == 0 && hint != 0 {
                return Err(err("zstd made no progress"));
            }
        }
    }
}

/// zstd as a [`Seekable`] format: seek points at frame starts.
pub struct Zstd;

impl Seekable for Zstd {
    fn index(
        &self,
        blob: Box<dyn BufRead + Send>,
        limits: index::Limits,
        span: u64,
    ) -> crate::error::Result<LayerIndex> {
        indexed(
            ZstdIndexingReader::with_span(blob, span),
            ZstdIndexingReader::seek_points,
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

/// Read `len` bytes from `start` of the zstd `blob`, decoding from the frame seek point at or
/// before `start`, into `out` (emptied first; its capacity is used).
pub fn read_at(
    blob: &mut (impl std::io::BufRead + Seek),
    checkpoints: &[Checkpoint],
    start: u64,
    len: usize,
    mut out: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    out.clear();
    let cp = checkpoint_before(checkpoints, start)?;
    blob.seek(SeekFrom::Start(cp.in_offset))?;
    let mut dec = zstd::stream::read::Decoder::with_buffer(blob)?;
    std::io::copy(
        &mut (&mut dec).take(start - cp.out_offset),
        &mut std::io::sink(),
    )?;
    out.reserve(len.min(2 * SPAN as usize));
    dec.take(len as u64).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % 3 == 0 {
                    s as u8
                } else {
                    b'a' + (s % 3) as u8
                }
            })
            .collect()
    }

    #[test]
    fn frames_become_seek_points_and_any_range_reads_back() {
        let parts: Vec<Vec<u8>> = (0..6)
            .map(|k| data(1_500_000 + k * 1000, k as u64 + 1))
            .collect();
        let mut blob = Vec::new();
        let mut all = Vec::new();
        for p in &parts {
            blob.extend(zstd::encode_all(&p[..], 3).unwrap());
            all.extend_from_slice(p);
        }
        let mut r = ZstdIndexingReader::new(&blob[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, all);
        let sp = r.seek_points();
        // 6 frames of ~1.5 MB, a point every 4 MiB or more: at frames 0, 3 (4.5 MB).
        assert_eq!(
            sp.checkpoints.len(),
            2,
            "{:?}",
            sp.checkpoints
                .iter()
                .map(|c| c.out_offset)
                .collect::<Vec<_>>()
        );
        assert_eq!(sp.span_digests.len(), 2);
        let second = &sp.checkpoints[1];
        assert_eq!(
            sp.span_digests[1],
            crate::digest::SpanDigest::of(&blob[second.in_offset as usize..])
        );
        let mut cur = std::io::Cursor::new(&blob);
        for (start, len) in [
            (0u64, 10usize),
            (4_600_000, 5000),
            (all.len() as u64 - 3, 10),
            (2_999_990, 30),
        ] {
            let got = read_at(&mut cur, &sp.checkpoints, start, len, Vec::new()).unwrap();
            let end = (start as usize + len).min(all.len());
            assert_eq!(got, &all[start as usize..end]);
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let blob = zstd::encode_all(&data(100_000, 9)[..], 3).unwrap();
        let mut r = ZstdIndexingReader::new(&blob[..blob.len() - 5]);
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
