//! A reader of layer tar streams that sees what Go's `archive/tar` sees, with limits enforced
//! before anything is held in memory.
//!
//! Docker, containerd, podman and umoci read layers with Go's reader, so where imgfs and it
//! disagree an image looks different in imgfs than in the container that runs it. Written by
//! hand rather than on the `tar` crate because the crate differs from Go exactly where a
//! layer's tree changes (it skips data after directory and link headers that claim a size,
//! takes the first of repeated PAX records, stops silently at a single zero block, knows no
//! PAX sparse files, decodes nothing as bytes only) and has no limits of its own (it reads a
//! long-name member whole, whatever its header claims: a small gzip bomb exhausts memory
//! before the blob's digest is checked). Case by case: docs/tar-dialect.md.

use std::io::{self, Read};

/// The most bytes a GNU long name/link or a PAX header member may hold: Go's limit
/// (`maxSpecialFileSize`), refused from the member's header, before it is read.
pub const MAX_META_MEMBER: u64 = 1 << 20;
/// Default for the most members one layer may have: each costs ~100 bytes of index in
/// memory; the biggest real layers have a few hundred thousand.
pub const DEFAULT_MAX_MEMBERS: u64 = 5_000_000;
/// Default for the most bytes a layer may expand to (`--max-uncompressed-size`).
pub const DEFAULT_MAX_UNCOMPRESSED: u64 = 64 << 30;
/// The most data regions one sparse file may list (16 bytes each in the index). Real sparse
/// files (`lastlog`, disk images) have a handful.
pub const MAX_SPARSE_REGIONS: usize = 1 << 16;

/// The most bytes read after the archive's end marker.
const TRAILING_MAX: u64 = 64 << 20;

const BLOCK: usize = 512;

mod header;
mod sparse;

use header::{RawHeader, Records, merge_pax, parse_pax};
pub use sparse::Region;
use sparse::check_regions;

/// Limits for one layer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most bytes the uncompressed tar stream may have.
    pub max_uncompressed: u64,
    /// The most tar members (headers) it may have.
    pub max_members: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uncompressed: DEFAULT_MAX_UNCOMPRESSED,
            max_members: DEFAULT_MAX_MEMBERS,
        }
    }
}

/// One member that describes a file system entry, with every extension header before it
/// (PAX records, GNU long names, sparse maps) applied as Go applies them.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    /// The type flag, with `'\0'` already read as a regular file (or a directory, for a name
    /// ending in `/`).
    pub typeflag: u8,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    /// The file's size; for a sparse file, with its holes.
    pub size: i64,
    /// Seconds since the epoch (a fractional PAX time rounded down).
    pub mtime: i64,
    pub dev_major: i64,
    pub dev_minor: i64,
    /// `SCHILY.xattr.NAME` records: (NAME, value), in the order first seen, last value kept.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the member's stored data starts in the uncompressed stream (for a sparse file,
    /// after its map).
    pub data_offset: u64,
    /// Bytes stored for this member from `data_offset` (0 for header-only types).
    pub stored: u64,
    /// For a sparse file, its data regions in order; they are stored one after another.
    pub sparse: Option<Vec<Region>>,
    /// Where the member's first header (extension headers included) starts in the stream.
    pub header_offset: u64,
}

/// Types whose members carry no data in Go's reader, whatever their size field says.
fn header_only(typeflag: u8) -> bool {
    matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Extension headers read for the entry that follows them.
#[derive(Default)]
struct Pending {
    pax: Records,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    /// Where the first of them started: the entry's `header_offset`.
    first_header: Option<u64>,
}

/// The tar stream of one layer, member by member.
pub struct TarReader<R> {
    inner: R,
    limits: Limits,
    /// Bytes read from `inner` so far: the position in the uncompressed stream.
    pos: u64,
    members: u64,
    /// Stored data of the current member not yet consumed, then its padding.
    remaining: u64,
    pad: u64,
    /// The current member's sparse regions and where its reader is in the file.
    regions: Vec<Region>,
    region: usize,
    logical: u64,
    logical_size: u64,
    sparse: bool,
    ended: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R, limits: Limits) -> TarReader<R> {
        TarReader {
            inner,
            limits,
            pos: 0,
            members: 0,
            remaining: 0,
            pad: 0,
            regions: Vec::new(),
            region: 0,
            logical: 0,
            logical_size: 0,
            sparse: false,
            ended: false,
        }
    }

    /// Bytes of the uncompressed stream consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Read from `inner` into `buf`, counting and enforcing the size limit.
    fn raw_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.pos += n as u64;
        if self.pos > self.limits.max_uncompressed {
            return Err(invalid(format!(
                "the layer expands past {} bytes (--max-uncompressed-size)",
                self.limits.max_uncompressed
            )));
        }
        Ok(n)
    }

    /// Fill `buf` as far as the stream goes; how many bytes came.
    fn fill_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let got = self.raw_read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        Ok(n)
    }

    /// Fill `buf`; `Ok(false)` if the stream ended before its first byte.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.fill_some(buf)? {
            0 if !buf.is_empty() => Ok(false),
            n if n == buf.len() => Ok(true),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn fill_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() || self.fill(buf)? {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    fn discard(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            let got = self.raw_read(&mut scratch[..want])?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Read a member's whole data (a PAX header or GNU long name), refused from its size.
    fn read_meta(&mut self, size: u64, what: &str, at: u64) -> io::Result<Vec<u8>> {
        if size > MAX_META_MEMBER {
            return Err(invalid(format!(
                "{what} of {size} bytes in the member at byte {at} (at most {MAX_META_MEMBER} \
                 are accepted)"
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.fill_exact(&mut data)?;
        self.discard(padding(size))?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive. Whatever the previous entry's
    /// reader left unread is skipped.
    pub fn next_entry(&mut self) -> io::Result<Option<Header>> {
        if self.ended {
            return Ok(None);
        }
        if !self.skip_rest()? {
            self.ended = true;
            return Ok(None);
        }
        self.sparse = false;
        let mut pending = Pending::default();
        loop {
            let at = self.pos;
            pending.first_header.get_or_insert(at);
            let Some(raw) = self.read_header(at)? else {
                self.ended = true;
                return Ok(None);
            };
            if !self.extension(&raw.header, at, &mut pending)? {
                return self.entry(raw, pending, at).map(Some);
            }
        }
    }

    /// Skip what the previous entry's reader left unread, and its padding; false when the
    /// stream ends where padding was due.
    fn skip_rest(&mut self) -> io::Result<bool> {
        self.discard(self.remaining)?;
        self.remaining = 0;
        // Padding missing at the very end of the stream is a clean end, as in Go.
        let pad = std::mem::take(&mut self.pad);
        if pad > 0 {
            let mut buf = vec![0u8; pad as usize];
            if !self.fill(&mut buf)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The header block at `at`, counted against the member limit and parsed; `None` at the
    /// end of the archive (the stream ends, or the two zero blocks that close it).
    fn read_header(&mut self, at: u64) -> io::Result<Option<RawHeader>> {
        let mut block = [0u8; BLOCK];
        match self.fill_some(&mut block)? {
            0 => return Ok(None),
            BLOCK => {}
            _ if at == 0 && compressed(&block).is_some() => {
                return Err(not_a_tar(&block));
            }
            _ => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
        if block.iter().all(|&b| b == 0) {
            // End of archive: two zero blocks. One zero block, then a header, is an
            // error in Go (an archive joined to another, or damage).
            if !self.fill(&mut block)? || block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            return Err(invalid(format!(
                "a single zero block at byte {at} is followed by more data (an archive \
                 ends with two)"
            )));
        }
        self.members += 1;
        if self.members > self.limits.max_members {
            return Err(invalid(format!(
                "the layer has more than {} tar members",
                self.limits.max_members
            )));
        }
        RawHeader::parse(&block).map(Some).map_err(|why| {
            if at == 0 && compressed(&block).is_some() {
                not_a_tar(&block)
            } else {
                invalid(format!("bad tar header at byte {at}: {why}"))
            }
        })
    }

    /// If `h` (at `at`) is an extension header — PAX (`x`, `g`) or GNU long name or link
    /// (`L`, `K`) — read it into `pending` and say so.
    fn extension(&mut self, h: &Header, at: u64, pending: &mut Pending) -> io::Result<bool> {
        match h.typeflag {
            b'x' | b'g' => {
                if h.size < 0 {
                    return Err(invalid(format!("PAX header at byte {at}: negative size")));
                }
                let data = self.read_meta(h.size as u64, "a PAX header", at)?;
                let records = parse_pax(&data)
                    .map_err(|why| invalid(format!("PAX header at byte {at}: {why}")))?;
                if h.typeflag == b'g' {
                    // Go returns a global header as an entry of its own, which ends
                    // what was pending; nothing applies it to later entries.
                    *pending = Pending::default();
                } else {
                    pending.pax = records;
                }
                Ok(true)
            }
            b'L' | b'K' => {
                if h.size < 0 {
                    return Err(invalid(format!(
                        "GNU long name at byte {at}: negative size"
                    )));
                }
                let what = if h.typeflag == b'L' {
                    "a GNU long name"
                } else {
                    "a GNU long link target"
                };
                let mut data = self.read_meta(h.size as u64, what, at)?;
                if let Some(nul) = data.iter().position(|&b| b == 0) {
                    data.truncate(nul);
                }
                if h.typeflag == b'L' {
                    pending.long_name = Some(data);
                } else {
                    pending.long_link = Some(data);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The entry of header `raw` (at `at`) with the `pending` extensions applied, its data
    /// (and sparse map, if any) set up for [`TarReader::data`].
    fn entry(&mut self, raw: RawHeader, pending: Pending, at: u64) -> io::Result<Header> {
        let RawHeader {
            header: mut h,
            block,
        } = raw;
        let Pending {
            pax,
            long_name,
            long_link,
            first_header,
        } = pending;
        let bad = |why: String| invalid(format!("tar header at byte {at}: {why}"));
        merge_pax(&mut h, &pax).map_err(bad)?;
        if let Some(n) = long_name.filter(|n| !n.is_empty()) {
            h.name = n;
        }
        if let Some(l) = long_link.filter(|l| !l.is_empty()) {
            h.link = l;
        }
        if h.typeflag == 0 {
            h.typeflag = if h.name.ends_with(b"/") { b'5' } else { b'0' };
        }
        let stored = if header_only(h.typeflag) { 0 } else { h.size };
        if stored < 0 {
            return Err(bad(format!("negative size {stored}")));
        }
        let stored = stored as u64;
        h.header_offset = first_header.unwrap_or(at);
        self.pad = padding(stored);
        self.remaining = stored;
        let map = if h.typeflag == b'S' {
            Some(
                self.old_gnu_sparse(&mut h, &block)
                    .map_err(|e| with_at(e, at))?,
            )
        } else {
            self.pax_sparse(&mut h, &pax).map_err(|e| with_at(e, at))?
        };
        h.data_offset = self.pos;
        h.stored = self.remaining;
        if let Some(regions) = map {
            if header_only(h.typeflag) {
                return Err(bad("a sparse map on an entry that has no data".into()));
            }
            check_regions(&regions, h.size, self.remaining).map_err(bad)?;
            self.sparse = true;
            self.logical = 0;
            self.region = 0;
            self.logical_size = h.size as u64;
            self.regions.clone_from(&regions);
            h.sparse = Some(regions);
            // Old GNU sparse members are regular files with a map.
            if h.typeflag == b'S' {
                h.typeflag = b'0';
            }
        }
        Ok(h)
    }

    /// Read the stream to its end after the archive's end marker, so that a decompressor's
    /// checks at the end run (garbage after the last gzip member is an error for every
    /// command alike: Go's readers fail on it too). Writers pad with a few KiB of zeros; more
    /// than `TRAILING_MAX` bytes is refused rather than read.
    pub fn finish(&mut self) -> io::Result<()> {
        let cap = self.limits.max_uncompressed.min(TRAILING_MAX);
        let mut scratch = [0u8; 8192];
        let mut trailing = 0u64;
        loop {
            let n = self.raw_read(&mut scratch)?;
            if n == 0 {
                return Ok(());
            }
            trailing += n as u64;
            if trailing > cap {
                return Err(invalid(format!(
                    "more than {cap} bytes follow the end of the tar archive"
                )));
            }
        }
    }

    /// A reader of the current entry's contents: holes of a sparse file read as zeros.
    pub fn data(&mut self) -> Data<'_, R> {
        Data { tar: self }
    }
}

/// The compression a stream's first bytes announce, if any.
fn compressed(start: &[u8]) -> Option<&'static str> {
    match start {
        [0x1f, 0x8b, ..] => Some("gzip"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        _ => None,
    }
}

/// A compressed blob declared as a plain tar: say so, rather than "bad checksum".
fn not_a_tar(start: &[u8]) -> io::Error {
    invalid(format!(
        "the stream is {}-compressed, not a tar (the layer's media type says uncompressed tar)",
        compressed(start).unwrap_or("otherwise")
    ))
}

fn too_many_regions() -> io::Error {
    invalid(format!(
        "a sparse map of more than {MAX_SPARSE_REGIONS} regions"
    ))
}

fn with_at(e: io::Error, at: u64) -> io::Error {
    if e.kind() == io::ErrorKind::InvalidData {
        invalid(format!("tar header at byte {at}: {e}"))
    } else {
        e
    }
}

/// The current entry's contents (see [`TarReader::data`]).
pub struct Data<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = &mut *self.tar;
        if buf.is_empty() {
            return Ok(0);
        }
        if !t.sparse {
            if t.remaining == 0 {
                return Ok(0);
            }
            let want = (buf.len() as u64).min(t.remaining) as usize;
            let n = t.raw_read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            t.remaining -= n as u64;
            return Ok(n);
        }
        if t.logical >= t.logical_size {
            return Ok(0);
        }
        // Step past regions already read.
        while t
            .regions
            .get(t.region)
            .is_some_and(|r| r.offset + r.len <= t.logical)
        {
            t.region += 1;
        }
        match t.regions.get(t.region).copied() {
            Some(r) if r.offset <= t.logical => {
                let left = r.offset + r.len - t.logical;
                let want = (buf.len() as u64).min(left) as usize;
                let n = t.raw_read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                t.remaining -= n as u64;
                t.logical += n as u64;
                Ok(n)
            }
            next => {
                let hole_end = next.map_or(t.logical_size, |r| r.offset);
                let n = (buf.len() as u64).min(hole_end - t.logical) as usize;
                buf[..n].fill(0);
                t.logical += n as u64;
                Ok(n)
            }
        }
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

#[cfg(test)]
mod tests;
