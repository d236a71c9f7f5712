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

use header::{RawHeader, Records, merge_pax, numeric, parse_int, parse_pax};

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

/// A stretch of a sparse file that holds data; everything between regions reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Where the region starts in the file.
    pub offset: u64,
    pub len: u64,
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
        self.discard(self.remaining)?;
        self.remaining = 0;
        // Padding missing at the very end of the stream is a clean end, as in Go.
        let pad = std::mem::take(&mut self.pad);
        if pad > 0 {
            let mut buf = vec![0u8; pad as usize];
            if !self.fill(&mut buf)? {
                self.ended = true;
                return Ok(None);
            }
        }
        self.sparse = false;
        let mut pax: Records = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut first_header = None;
        loop {
            let at = self.pos;
            first_header.get_or_insert(at);
            let mut block = [0u8; BLOCK];
            match self.fill_some(&mut block)? {
                0 => {
                    self.ended = true;
                    return Ok(None);
                }
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
                    self.ended = true;
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
            let raw = RawHeader::parse(&block).map_err(|why| {
                if at == 0 && compressed(&block).is_some() {
                    not_a_tar(&block)
                } else {
                    invalid(format!("bad tar header at byte {at}: {why}"))
                }
            })?;
            let mut h = raw.header;
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
                        pax.clear();
                        long_name = None;
                        long_link = None;
                        first_header = None;
                    } else {
                        pax = records;
                    }
                    continue;
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
                        long_name = Some(data);
                    } else {
                        long_link = Some(data);
                    }
                    continue;
                }
                _ => {}
            }
            let bad = |why: String| invalid(format!("tar header at byte {at}: {why}"));
            merge_pax(&mut h, &pax).map_err(bad)?;
            if let Some(n) = long_name.take().filter(|n| !n.is_empty()) {
                h.name = n;
            }
            if let Some(l) = long_link.take().filter(|l| !l.is_empty()) {
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
                    self.old_gnu_sparse(&mut h, &raw.block)
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
            return Ok(Some(h));
        }
    }

    /// Old GNU sparse (`tar --sparse --format=gnu`): the map is in the header and in
    /// extension blocks that follow it (before the data); the header's size is what is
    /// stored, `realsize` the file's size.
    fn old_gnu_sparse(&mut self, h: &mut Header, block: &[u8; BLOCK]) -> io::Result<Vec<Region>> {
        if &block[257..263] != b"ustar " || &block[263..265] != b" \0" {
            return Err(invalid(
                "a sparse member (type S) without a GNU header".into(),
            ));
        }
        h.size = numeric(&block[483..495]).map_err(|e| invalid(format!("realsize: {e}")))?;
        let mut regions = Vec::new();
        let mut table: Vec<u8> = block[386..483].to_vec();
        let mut entries = 4;
        loop {
            for i in 0..entries {
                let e = &table[i * 24..i * 24 + 24];
                if e[0] == 0 {
                    break;
                }
                let offset = numeric(&e[..12]).map_err(|e| invalid(format!("sparse map: {e}")))?;
                let len = numeric(&e[12..]).map_err(|e| invalid(format!("sparse map: {e}")))?;
                push_region(&mut regions, offset, len)?;
            }
            if table[entries * 24] == 0 {
                return Ok(regions);
            }
            let mut ext = [0u8; BLOCK];
            self.fill_exact(&mut ext)?;
            table = ext.to_vec();
            entries = 21;
        }
    }

    /// PAX sparse files (`tar --sparse --format=pax`), versions 0.0, 0.1 and 1.0, decided
    /// as Go decides them. 1.0 keeps its map at the start of the stored data.
    fn pax_sparse(&mut self, h: &mut Header, pax: &Records) -> io::Result<Option<Vec<Region>>> {
        let get = |k: &str| {
            pax.iter()
                .find(|(key, _)| key == k.as_bytes())
                .map(|(_, v)| v.as_slice())
                .unwrap_or_default()
        };
        let (major, minor) = (get("GNU.sparse.major"), get("GNU.sparse.minor"));
        let v1 = match (major, minor) {
            (b"0", b"0" | b"1") => false,
            (b"1", b"0") => true,
            (b"", b"") if !get("GNU.sparse.map").is_empty() => false,
            _ => return Ok(None),
        };
        let name = get("GNU.sparse.name");
        if !name.is_empty() {
            h.name = name.to_vec();
        }
        let size = match get("GNU.sparse.size") {
            b"" => get("GNU.sparse.realsize"),
            s => s,
        };
        if !size.is_empty() {
            h.size = parse_int(size).ok_or_else(|| invalid("bad GNU.sparse.size".into()))?;
        }
        let mut regions = Vec::new();
        if v1 {
            regions = self.sparse_map_v1()?;
        } else {
            let count = parse_int(get("GNU.sparse.numblocks"))
                .filter(|n| *n >= 0)
                .ok_or_else(|| invalid("bad GNU.sparse.numblocks".into()))?;
            let map = get("GNU.sparse.map");
            let fields: Vec<&[u8]> = if map.is_empty() {
                Vec::new()
            } else {
                map.split(|&b| b == b',').collect()
            };
            if fields.len() as i64 != count.saturating_mul(2) {
                return Err(invalid(format!(
                    "GNU.sparse.map has {} numbers for {count} regions",
                    fields.len()
                )));
            }
            for pair in fields.chunks(2) {
                let (Some(offset), Some(len)) = (parse_int(pair[0]), parse_int(pair[1])) else {
                    return Err(invalid("bad GNU.sparse.map entry".into()));
                };
                push_region(&mut regions, offset, len)?;
            }
        }
        Ok(Some(regions))
    }

    /// The 1.0 sparse map at the start of the stored data: `N\n`, then N pairs of
    /// `offset\nlength\n`, padded to whole blocks (Go's `readGNUSparseMap1x0`).
    fn sparse_map_v1(&mut self) -> io::Result<Vec<Region>> {
        let mut text: Vec<u8> = Vec::new();
        let mut lines = 0usize;
        let mut cursor = 0usize;
        let mut token = |this: &mut Self, text: &mut Vec<u8>| -> io::Result<Option<i64>> {
            while lines == 0 {
                if this.remaining < BLOCK as u64 {
                    return Err(invalid("the sparse map runs past the entry's data".into()));
                }
                let mut blk = [0u8; BLOCK];
                this.fill_exact(&mut blk)?;
                this.remaining -= BLOCK as u64;
                lines += blk.iter().filter(|&&b| b == b'\n').count();
                text.extend_from_slice(&blk);
            }
            lines -= 1;
            let end = cursor + text[cursor..].iter().position(|&b| b == b'\n').unwrap_or(0);
            let tok = parse_int(&text[cursor..end]);
            cursor = end + 1;
            Ok(tok)
        };
        let n = token(self, &mut text)?
            .filter(|n| *n >= 0)
            .ok_or_else(|| invalid("bad sparse map count".into()))?;
        if n > MAX_SPARSE_REGIONS as i64 {
            return Err(too_many_regions());
        }
        let mut regions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let offset = token(self, &mut text)?;
            let len = token(self, &mut text)?;
            let (Some(offset), Some(len)) = (offset, len) else {
                return Err(invalid("bad sparse map entry".into()));
            };
            push_region(&mut regions, offset, len)?;
        }
        Ok(regions)
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

fn push_region(regions: &mut Vec<Region>, offset: i64, len: i64) -> io::Result<()> {
    if offset < 0 || len < 0 {
        return Err(invalid(format!("sparse region {offset}+{len} is negative")));
    }
    if regions.len() >= MAX_SPARSE_REGIONS {
        return Err(too_many_regions());
    }
    regions.push(Region {
        offset: offset as u64,
        len: len as u64,
    });
    Ok(())
}

/// Go's `validateSparseEntries`, and what its reader checks as it reads: regions in order,
/// not overlapping, inside the file, and together exactly the bytes stored.
fn check_regions(regions: &[Region], size: i64, stored: u64) -> Result<(), String> {
    if size < 0 {
        return Err(format!("negative sparse file size {size}"));
    }
    let mut end = 0u64;
    let mut total = 0u64;
    for r in regions {
        let r_end = r
            .offset
            .checked_add(r.len)
            .filter(|e| *e <= size as u64)
            .ok_or_else(|| {
                format!(
                    "sparse region {}+{} runs past the file's size {size}",
                    r.offset, r.len
                )
            })?;
        if r.offset < end {
            return Err(format!(
                "sparse region at {} overlaps or precedes the one before",
                r.offset
            ));
        }
        end = r_end;
        total += r.len;
    }
    if total != stored {
        return Err(format!(
            "the sparse map lists {total} bytes of data but the entry stores {stored}"
        ));
    }
    Ok(())
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
