//! What all seekable formats share while indexing and reading by range: hashing the
//! compressed bytes a reader consumes into span digests ([`SpanHasher`]), the compressed bytes
//! of one fetched span readable at the blob's own offsets ([`SpanBytes`]), and the plain
//! (uncompressed) layer's indexer, which only cuts spans ([`PlainIndexingReader`]).

use std::io::{BufRead, Read, Seek, SeekFrom};

use super::format::{Blob, Seekable, indexed};
use crate::digest::SpanDigest;
use crate::index::seek_points::{Checkpoint, SPAN, SeekPoints};
use crate::index::{self, LayerIndex};

/// A `BufRead` that hashes every byte its user consumes, in spans cut by [`Self::cut`].
pub(crate) struct SpanHasher<R: BufRead> {
    pub(crate) inner: R,
    pub(crate) hasher: Option<blake3::Hasher>,
    pub(crate) last: Option<u8>,
    pub(crate) spans: Vec<SpanDigest>,
}

impl<R: BufRead> SpanHasher<R> {
    /// End the current span (if any) and start one; `with_last` makes the new span begin
    /// with the byte consumed last (a checkpoint in the middle of a byte needs it).
    pub(crate) fn cut(&mut self, with_last: bool) {
        if let Some(h) = self.hasher.take() {
            self.spans.push(SpanDigest::of_hasher(&h));
        }
        let mut h = blake3::Hasher::new();
        if with_last && let Some(b) = self.last {
            h.update(&[b]);
        }
        self.hasher = Some(h);
    }

    pub(crate) fn new(inner: R) -> SpanHasher<R> {
        SpanHasher {
            inner,
            hasher: None,
            last: None,
            spans: Vec::new(),
        }
    }

    /// End the last span; with the checkpoints the spans start at, what indexing recorded.
    pub(crate) fn into_seek_points(mut self, checkpoints: Vec<Checkpoint>) -> SeekPoints {
        if let Some(h) = self.hasher.take() {
            self.spans.push(SpanDigest::of_hasher(&h));
        }
        SeekPoints {
            checkpoints,
            span_digests: self.spans,
            windows_apart: None,
        }
    }
}

impl<R: BufRead> Read for SpanHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let avail = self.fill_buf()?;
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for SpanHasher<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if amt > 0
            && let Ok(buf) = self.inner.fill_buf()
        {
            let used = &buf[..amt.min(buf.len())];
            if let Some(h) = &mut self.hasher {
                h.update(used);
            }
            self.last = used.last().copied().or(self.last);
        }
        self.inner.consume(amt);
    }
}

/// A plain tar as a [`Seekable`] format: read in place, seek points only to verify spans.
pub struct Plain;

impl Seekable for Plain {
    fn index(
        &self,
        blob: Box<dyn BufRead + Send>,
        limits: index::Limits,
        span: u64,
    ) -> crate::error::Result<LayerIndex> {
        indexed(
            PlainIndexingReader::with_span(blob, span),
            PlainIndexingReader::seek_points,
            limits,
        )
    }

    fn read_at(
        &self,
        blob: &mut dyn Blob,
        _: &[Checkpoint],
        start: u64,
        len: usize,
        mut out: Vec<u8>,
    ) -> std::io::Result<Vec<u8>> {
        out.clear();
        blob.seek(SeekFrom::Start(start))?;
        blob.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// An uncompressed layer passed through unchanged, recording a seek point every [`SPAN`]
/// bytes and the BLAKE3 digest of each span, so that range reads of plain layers are verified the
/// same way as those of compressed ones.
pub struct PlainIndexingReader<R: BufRead> {
    src: SpanHasher<R>,
    pos: u64,
    span: u64,
    checkpoints: Vec<Checkpoint>,
}

impl<R: BufRead> PlainIndexingReader<R> {
    pub fn new(src: R) -> PlainIndexingReader<R> {
        Self::with_span(src, SPAN)
    }

    pub fn with_span(src: R, span: u64) -> PlainIndexingReader<R> {
        PlainIndexingReader {
            src: SpanHasher::new(src),
            pos: 0,
            span: span.max(1),
            checkpoints: Vec::new(),
        }
    }

    /// The seek points and span digests; call after reading to the end.
    pub fn seek_points(self) -> SeekPoints {
        self.src.into_seek_points(self.checkpoints)
    }
}

impl<R: BufRead> Read for PlainIndexingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.src.fill_buf()?.len();
        if avail == 0 || buf.is_empty() {
            return Ok(0);
        }
        // A span starts only where there is data for it: no empty last span.
        if self.pos.is_multiple_of(self.span)
            && self
                .checkpoints
                .last()
                .is_none_or(|c| c.out_offset < self.pos)
        {
            self.src.cut(false);
            self.checkpoints.push(Checkpoint {
                in_offset: self.pos,
                bits: 0,
                out_offset: self.pos,
                window: Vec::new(),
            });
        }
        let to_boundary = self.span - self.pos % self.span;
        let n = avail.min(buf.len()).min(to_boundary as usize);
        let got = self.src.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Some compressed bytes of a blob held in memory — one span fetched by range — readable
/// with the blob's own offsets, so [`read_at`] works on them as on the whole blob. Reading
/// past them is end of file.
pub struct SpanBytes {
    base: u64,
    cur: std::io::Cursor<bytes::Bytes>,
}

impl SpanBytes {
    /// `bytes` are the blob's bytes from offset `base` on.
    pub fn new(base: u64, bytes: bytes::Bytes) -> SpanBytes {
        SpanBytes {
            base,
            cur: std::io::Cursor::new(bytes),
        }
    }
}

impl Read for SpanBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.cur.read(buf)
    }
}

impl std::io::BufRead for SpanBytes {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.cur.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.cur.consume(n)
    }
}

impl Seek for SpanBytes {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let SeekFrom::Start(at) = to else {
            return Err(std::io::Error::other("span bytes seek only from the start"));
        };
        let rel = at.checked_sub(self.base).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "seek before the fetched span",
            )
        })?;
        self.cur.set_position(rel);
        Ok(at)
    }
}
