//! The table of contents eStargz defined and zstd:chunked reuses (stargz-snapshotter's
//! `docs/estargz.md`; containers/storage's `pkg/chunked`): a JSON list of tar entries whose
//! regular files point at chunks of the blob, each decompressing on its own to bytes with a
//! sha256. Turned here into a layer index and a chunk table per file; each format
//! (`estargz`, `zstd_chunked`) says where its TOC is, vouches for it, and decodes chunks.
//!
//! Chunks end at the next boundary in the blob: the next chunk's start, a file's
//! `endOffset` (zstd:chunked as skopeo writes it), or where the data ends (the TOC). Readers
//! decode exactly a chunk's size from there, since some writers put a file's tar padding and
//! the next header in its last frame (ctr-remote's zstd:chunked).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::format::{Chunk, TocLayer};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::index::{self, Entry, Kind};

/// What differs between the formats that use this TOC.
pub struct Dialect {
    /// The format, for messages ("eStargz").
    pub name: &'static str,
    /// Entries the format adds that are not the image's files.
    pub hidden: &'static [&'static str],
}

/// Marks the end of the files the image's builder wants read first (eStargz; ctr-remote
/// writes it into zstd:chunked layers too).
const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

pub const ESTARGZ: Dialect = Dialect {
    name: "eStargz",
    hidden: &["stargz.index.json", PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK],
};

pub const ZSTD_CHUNKED: Dialect = Dialect {
    name: "zstd:chunked",
    hidden: &[PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK],
};

/// The biggest chunk read whole into memory. Writers cut at 4 MiB by default; a TOC
/// announcing more is refused (the layer is then indexed the ordinary way).
const MAX_CHUNK: u64 = 64 << 20;

impl Dialect {
    fn bad(&self, reason: impl std::fmt::Display) -> Error {
        Error::malformed(format!("{} layer", self.name), reason)
    }
}

#[derive(Deserialize)]
struct Toc {
    version: u32,
    entries: Vec<TocEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default)]
    link_name: String,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    dev_major: u32,
    #[serde(default)]
    dev_minor: u32,
    /// Values are base64, as Go encodes `[]byte`.
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    chunk_digest: Option<String>,
    /// Several payloads in one gzip member (`--estargz-min-chunk-size`): not read lazily.
    #[serde(default)]
    inner_offset: u64,
    /// zstd:chunked (skopeo): where a regular file's last frame ends.
    #[serde(default)]
    end_offset: u64,
    /// zstd:chunked (skopeo): `zeros` for a chunk of zeros (a hole), made here.
    #[serde(default)]
    chunk_type: String,
}

/// Seconds since the epoch of an RFC 3339 time as Go writes it (`2006-01-02T15:04:05Z`,
/// maybe with fractional seconds and a `±hh:mm` zone). By hand: one format, a few lines, where
/// a date crate would be a dependency for this alone.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        rest = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let zone = match rest {
        "Z" | "z" => 0,
        z if z.len() == 6 && z.is_ascii() && (z.starts_with('+') || z.starts_with('-')) => {
            let off = z[1..3].parse::<i64>().ok()? * 3600 + z[4..6].parse::<i64>().ok()? * 60;
            if z.starts_with('-') { -off } else { off }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - zone)
}

fn base64_decode(d: &Dialect, s: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| d.bad(format!("xattr value is not base64: {e}")))
}

/// Turn a verified TOC into a layer index and chunk table. File data ends at `data_end` (where
/// the TOC's member or frame starts).
pub fn parse(json: &[u8], data_end: u64, d: &Dialect) -> Result<TocLayer> {
    let toc: Toc = serde_json::from_slice(json).map_err(|e| d.bad(format!("TOC: {e}")))?;
    if toc.version != 1 {
        return Err(Error::Unsupported {
            what: format!("{} TOC version", d.name),
            value: toc.version.to_string(),
        });
    }
    let starts = member_starts(d, &toc.entries, data_end)?;
    let mut out = TocLayer::default();
    let mut by_name: BTreeMap<bstr::BString, usize> = BTreeMap::new();
    let mut landmark_seen = false;
    for e in &toc.entries {
        let raw = e.name.trim_start_matches("./").trim_start_matches('/');
        if d.hidden.contains(&raw.trim_end_matches('/')) {
            if raw == PREFETCH_LANDMARK {
                landmark_seen = true;
            }
            continue;
        }
        if e.kind == "chunk" {
            let path = index::normalize(raw.as_bytes())?;
            let &i = by_name
                .get(&path)
                .ok_or_else(|| d.bad(format!("chunk of {:?} before its file", e.name)))?;
            let chunk = later_chunk(d, e, out.index.entries[i].size, &starts)?;
            out.chunks[i].push(chunk);
            continue;
        }
        let entry = toc_entry(d, e, raw)?;
        let i = out.index.entries.len();
        let mut chunks = Vec::new();
        if entry.kind == Kind::File && e.size > 0 {
            chunks.push(first_chunk(d, e, &starts)?);
        }
        if !landmark_seen && entry.kind == Kind::File {
            out.prefetch.push(i);
        }
        by_name.insert(entry.path.clone(), i);
        out.index.entries.push(entry);
        out.chunks.push(chunks);
    }
    if !landmark_seen {
        out.prefetch.clear();
    }
    check_tiling(d, &mut out)?;
    Ok(out)
}

/// Where each member (or frame) that holds file data starts, where the writer says a file's
/// data ends (`endOffset`), and where all data ends, in order: every chunk ends at the next
/// of them. Refuses layouts imgfs cannot read by chunk (payloads sharing a member, two
/// chunks at one offset).
fn member_starts(d: &Dialect, entries: &[TocEntry], data_end: u64) -> Result<Vec<u64>> {
    let mut starts: Vec<u64> = entries
        .iter()
        .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk")
        .map(|e| e.offset)
        .collect();
    if entries.iter().any(|e| e.inner_offset != 0) {
        return Err(Error::Unsupported {
            what: format!("{} layout", d.name),
            value: "payloads sharing a gzip member (innerOffset)".into(),
        });
    }
    let data_count = starts.len();
    starts.push(data_end);
    starts.sort_unstable();
    starts.dedup();
    // Each chunk is its own member: two at one offset would be read one as the other.
    if starts.len() != data_count + 1 {
        return Err(d.bad("two chunks share an offset (or one sits at the TOC)"));
    }
    starts.extend(
        (entries.iter())
            .map(|e| e.end_offset)
            .filter(|&end| end != 0 && end < data_end),
    );
    starts.sort_unstable();
    starts.dedup();
    Ok(starts)
}

/// Where the chunk at `offset` ends: the next boundary after it (see [`member_starts`]).
fn end_of(d: &Dialect, starts: &[u64], offset: u64) -> Result<u64> {
    let i = starts.partition_point(|&s| s <= offset);
    starts
        .get(i)
        .copied()
        .ok_or_else(|| d.bad(format!("chunk at {offset} lies past the TOC")))
}

/// The digest a chunk entry's bytes must have once decompressed.
fn chunk_digest(d: &Dialect, e: &TocEntry) -> Result<Digest> {
    let digest = e.chunk_digest.as_deref().or(
        // A file in one chunk may carry only the whole file's digest.
        if e.chunk_offset == 0 && (e.chunk_size == 0 || e.chunk_size == e.size) {
            e.digest.as_deref()
        } else {
            None
        },
    );
    let digest = digest.ok_or_else(|| d.bad(format!("{:?}: a chunk without a digest", e.name)))?;
    Digest::parse(digest).map_err(|_| d.bad(format!("{:?}: bad chunk digest {digest:?}", e.name)))
}

/// The first chunk of a regular file, from its own entry (the whole file when its chunk
/// size is 0).
fn first_chunk(d: &Dialect, e: &TocEntry, starts: &[u64]) -> Result<Chunk> {
    let first = if e.chunk_size == 0 {
        e.size
    } else {
        e.chunk_size
    };
    Ok(Chunk {
        offset: e.offset,
        end: end_of(d, starts, e.offset)?,
        file_offset: 0,
        size: first,
        digest: chunk_digest(d, e)?,
        zeros: e.chunk_type == "zeros",
    })
}

/// A later chunk of a file `size` bytes long, from a `chunk` entry (to the file's end when
/// its chunk size is 0).
fn later_chunk(d: &Dialect, e: &TocEntry, size: u64, starts: &[u64]) -> Result<Chunk> {
    let chunk_size = if e.chunk_size == 0 {
        size.saturating_sub(e.chunk_offset)
    } else {
        e.chunk_size
    };
    Ok(Chunk {
        offset: e.offset,
        end: end_of(d, starts, e.offset)?,
        file_offset: e.chunk_offset,
        size: chunk_size,
        digest: chunk_digest(d, e)?,
        zeros: e.chunk_type == "zeros",
    })
}

/// The index entry of a TOC entry other than a chunk; `raw` is its name without a leading
/// `./` or `/`.
fn toc_entry(d: &Dialect, e: &TocEntry, raw: &str) -> Result<Entry> {
    let kind = match e.kind.as_str() {
        "dir" => Kind::Dir,
        "reg" => Kind::File,
        "symlink" => Kind::Symlink,
        "hardlink" => Kind::Hardlink,
        "char" => Kind::Char,
        "block" => Kind::Block,
        "fifo" => Kind::Fifo,
        other => return Err(d.bad(format!("{:?}: unknown entry type {other:?}", e.name))),
    };
    let (path, kind) = index::classify(raw.as_bytes(), kind)?;
    let link = match kind {
        Kind::Symlink => Some(e.link_name.clone().into()),
        Kind::Hardlink => Some(index::normalize(e.link_name.as_bytes())?),
        _ => None,
    };
    let mut xattrs = Vec::new();
    for (k, v) in &e.xattrs {
        if index::keep_xattr(k) {
            xattrs.push((k.clone(), base64_decode(d, v)?));
        }
    }
    Ok(Entry {
        path,
        kind,
        mode: (e.mode & 0o7777) as u32,
        uid: e.uid,
        gid: e.gid,
        size: if kind == Kind::File { e.size } else { 0 },
        mtime: e.modtime.as_deref().and_then(parse_time).unwrap_or(0),
        link,
        dev_major: e.dev_major,
        dev_minor: e.dev_minor,
        xattrs,
        offset: 0,
        sparse: Vec::new(),
    })
}

/// Chunks must tile each file exactly: a gap or an overlap would serve wrong bytes. Sorts
/// each file's chunks by their offset in the file.
fn check_tiling(d: &Dialect, out: &mut TocLayer) -> Result<()> {
    for (i, chunks) in out.chunks.iter_mut().enumerate() {
        chunks.sort_by_key(|c| c.file_offset);
        let mut at = 0;
        for c in chunks.iter() {
            if c.size > MAX_CHUNK {
                return Err(d.bad(format!(
                    "{:?}: a chunk of {} bytes (imgfs reads chunks up to {MAX_CHUNK})",
                    out.index.entries[i].path, c.size
                )));
            }
            if c.file_offset != at || c.end <= c.offset || c.end - c.offset > MAX_CHUNK {
                return Err(d.bad(format!(
                    "{:?}: chunks do not cover the file",
                    out.index.entries[i].path
                )));
            }
            at = at.saturating_add(c.size);
        }
        if !chunks.is_empty() && at != out.index.entries[i].size {
            return Err(d.bad(format!(
                "{:?}: chunks cover {at} of {} bytes",
                out.index.entries[i].path, out.index.entries[i].size
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_times_parse() {
        assert_eq!(parse_time("2024-01-01T00:00:00+1é00"), None);
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2024-01-01T00:00:00Z"), Some(1_704_067_200));
        assert_eq!(
            parse_time("2024-01-01T01:00:00.5+01:00"),
            Some(1_704_067_200)
        );
        assert_eq!(parse_time("2000-02-29T12:00:00Z"), Some(951_825_600));
        assert_eq!(parse_time("yesterday"), None);
    }
}
