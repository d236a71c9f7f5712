//! Sparse files, in every format Go's reader knows: old GNU (`tar --sparse --format=gnu`, the
//! map in the header and extension blocks), and PAX 0.0, 0.1 and 1.0 (the map in records,
//! or at the start of the stored data). The map is read and checked here as Go checks it;
//! the holes are filled in by [`super::Data`].

use std::io::{self, Read};

use super::header::{Records, numeric, parse_int};
use super::{BLOCK, Header, MAX_SPARSE_REGIONS, TarReader, invalid, too_many_regions};

/// A stretch of a sparse file that holds data; everything between regions reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Where the region starts in the file.
    pub offset: u64,
    pub len: u64,
}

impl<R: Read> TarReader<R> {
    /// Old GNU sparse (`tar --sparse --format=gnu`): the map is in the header and in
    /// extension blocks that follow it (before the data); the header's size is what is
    /// stored, `realsize` the file's size.
    pub(super) fn old_gnu_sparse(
        &mut self,
        h: &mut Header,
        block: &[u8; BLOCK],
    ) -> io::Result<Vec<Region>> {
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
    pub(super) fn pax_sparse(
        &mut self,
        h: &mut Header,
        pax: &Records,
    ) -> io::Result<Option<Vec<Region>>> {
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
pub(super) fn check_regions(regions: &[Region], size: i64, stored: u64) -> Result<(), String> {
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
