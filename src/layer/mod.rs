//! Layer blobs as tar streams: undo gzip or zstd (or nothing) on a verified blob, as one
//! stream (`decompress`), or at random, through the traits of `format` with one
//! implementation per format (`gzip`, `zstd`, plain in `span`, `estargz`, `zstd_chunked`; the
//! last two share the TOC of `toc`).

pub mod estargz;
pub mod format;
pub mod gzip;
pub mod span;
pub mod toc;
pub mod zstd;
pub mod zstd_chunked;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{IoContext, Result};

/// Reads the chunks a download sends through a channel, as one byte stream; the stream ends
/// when the sender is dropped. Lets a blocking decompressor consume a blob while it arrives.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> ChannelReader {
        ChannelReader {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
use crate::manifest::Compression;

/// A reader of the uncompressed tar stream of the blob at `path`.
pub fn open_tar_stream(path: &Path, compression: Compression) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).ctx(|| format!("opening layer blob {}", path.display()))?;
    decompress(file, compression).ctx(|| format!("starting to decompress {}", path.display()))
}

/// The uncompressed tar stream of a blob read from `blob`.
pub fn decompress(
    blob: impl Read + Send + 'static,
    compression: Compression,
) -> std::io::Result<Box<dyn Read + Send>> {
    let buffered = BufReader::with_capacity(256 << 10, NotEmpty::new(blob, compression));
    Ok(match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(GzipMembers::new(buffered)),
        Compression::Zstd => Box::new(::zstd::stream::read::Decoder::with_buffer(buffered)?),
    })
}

/// A compressed blob that must hold something: an empty file is no gzip or zstd stream (Go's
/// gzip reader refuses it too), while an empty plain tar is an empty layer. Every reader of
/// layer blobs (`pull`'s and the indexer's) starts with it, so that all commands agree.
pub struct NotEmpty<R> {
    inner: R,
    compression: Compression,
    seen: bool,
}

impl<R> NotEmpty<R> {
    pub fn new(inner: R, compression: Compression) -> NotEmpty<R> {
        NotEmpty {
            inner,
            compression,
            seen: compression == Compression::None,
        }
    }
}

impl<R: Read> Read for NotEmpty<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !self.seen && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the layer blob is empty (no {} stream)",
                    format!("{:?}", self.compression).to_lowercase()
                ),
            ));
        }
        self.seen = true;
        Ok(n)
    }
}

/// A gzip stream of one or more members (pigz and eStargz write many), decompressed without
/// its CRC-32 check. Written by hand around flate2's raw deflate decoder because flate2's gzip
/// readers always compute the CRC, which cost 7% of a pull's CPU: every blob is sha256-verified
/// before its extraction is kept, so the CRC adds nothing. The cheap `ISIZE` check stays.
pub struct GzipMembers<R: BufRead> {
    member: Option<flate2::bufread::DeflateDecoder<R>>,
    between: Option<R>,
    /// Bytes produced by the current member (mod 2^32, as gzip records it).
    produced: u32,
}

impl<R: BufRead> GzipMembers<R> {
    pub fn new(r: R) -> GzipMembers<R> {
        GzipMembers {
            member: None,
            between: Some(r),
            produced: 0,
        }
    }
}

fn gzip_error(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("gzip: {msg}"))
}

impl<R: BufRead> Read for GzipMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(d) = &mut self.member {
                let n = d.read(buf)?;
                if n > 0 {
                    self.produced = self.produced.wrapping_add(n as u32);
                    return Ok(n);
                }
                // End of this member: its trailer is CRC-32 (skipped) and ISIZE.
                let mut r = self.member.take().expect("checked above").into_inner();
                let mut trailer = [0u8; 8];
                r.read_exact(&mut trailer)
                    .map_err(|_| gzip_error("stream truncated (no member trailer)"))?;
                let isize = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
                if isize != self.produced {
                    return Err(gzip_error("member length does not match its trailer"));
                }
                self.between = Some(r);
            }
            let Some(mut r) = self.between.take() else {
                return Ok(0);
            };
            let next = r.fill_buf()?;
            if next.is_empty() || next.iter().all(|b| *b == 0) {
                // End of stream; some writers pad with zeros, which GNU gzip ignores too.
                let n = next.len();
                r.consume(n);
                if n == 0 {
                    return Ok(0);
                }
                self.between = Some(r);
                continue;
            }
            gzip::skip_header(&mut r)?;
            self.produced = 0;
            self.member = Some(flate2::bufread::DeflateDecoder::new(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8], name: bool) -> Vec<u8> {
        let mut b = flate2::GzBuilder::new();
        if name {
            b = b.filename("member.tar").comment("c").extra(vec![1, 2, 3]);
        }
        let mut e = b.write(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn read_all(bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        GzipMembers::new(&bytes[..]).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn reads_every_member_with_any_header_fields() {
        let mut s = gz(b"first ", true);
        s.extend(gz(b"second", false));
        s.extend(gz(b"", false));
        s.extend([0u8; 10]);
        assert_eq!(read_all(s).unwrap(), b"first second");
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let s = gz(&[5u8; 100_000], false);
        assert!(read_all(s[..s.len() - 4].to_vec()).is_err(), "cut trailer");
        assert!(read_all(s[..s.len() / 2].to_vec()).is_err(), "cut data");
        let mut g = s.clone();
        g.extend(b"junk");
        assert!(read_all(g).is_err(), "garbage after the last member");
    }
}
