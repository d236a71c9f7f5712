//! eStargz layers (stargz-snapshotter's `docs/estargz.md`): gzip layers written so that each
//! file chunk starts a gzip member, with a table of contents (`stargz.index.json`, the TOC) in
//! a member near the end and a 51-byte footer pointing at it. The TOC is read with two range
//! requests from the blob's end and checked against the layer's `toc.digest` annotation; it
//! then stands in for the layer index, and each chunk is fetched on its own and checked
//! against its `chunkDigest`. No byte of the layer is used unverified, and no full download
//! is needed.
//!
//! The trust chain is the one eStargz defines: manifest digest → layer annotation → TOC →
//! chunk digests. The blob digest itself is not checked on this path (that needs the whole
//! blob); a layer without the annotation is indexed the ordinary way.

use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;

use super::format::{Chunk, TocFormat, TocLayer};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::index::{self, Entry, Kind};
use crate::manifest::Compression;

/// The layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The footer: an empty gzip member whose extra field holds the TOC's offset.
pub const FOOTER_SIZE: u64 = 51;
const TOC_NAME: &str = "stargz.index.json";
/// Entries eStargz adds that are not part of the image's files.
const HIDDEN: [&str; 3] = [TOC_NAME, ".prefetch.landmark", ".no.prefetch.landmark"];
const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// A TOC bigger than this is not one we will parse (a few hundred bytes per file).
const MAX_TOC: u64 = 256 << 20;
/// The biggest chunk read whole into memory. eStargz writers cut at 4 MiB by default; a TOC
/// announcing more is refused (the layer is then indexed the ordinary way).
const MAX_CHUNK: u64 = 64 << 20;

fn bad(reason: impl std::fmt::Display) -> Error {
    Error::malformed("eStargz layer", reason)
}

/// The TOC digest a layer descriptor announces, if it is an eStargz layer.
pub fn toc_digest(annotations: &BTreeMap<String, String>) -> Option<Result<Digest>> {
    annotations.get(TOC_DIGEST_ANNOTATION).map(|d| {
        Digest::parse(d).map_err(|_| bad(format!("{TOC_DIGEST_ANNOTATION} is not a digest: {d:?}")))
    })
}

/// The TOC member's offset, from the footer (the blob's last [`FOOTER_SIZE`] bytes).
pub fn parse_footer(footer: &[u8]) -> Result<u64> {
    // gzip header with FEXTRA (flags 4); XLEN 26; subfield "SG", length 22: 16 hex digits of
    // the offset, then "STARGZ".
    if footer.len() != FOOTER_SIZE as usize
        || footer[..4] != [0x1f, 0x8b, 0x08, 0x04]
        || footer[10..12] != [26, 0]
        || &footer[12..14] != b"SG"
        || footer[14..16] != [22, 0]
        || &footer[32..38] != b"STARGZ"
    {
        return Err(bad("no eStargz footer at the end of the blob"));
    }
    let hex = std::str::from_utf8(&footer[16..32]).map_err(|_| bad("footer offset is not text"))?;
    u64::from_str_radix(hex, 16).map_err(|_| bad(format!("footer offset {hex:?} is not hex")))
}

/// eStargz as a [`TocFormat`].
pub struct Estargz;

impl TocFormat for Estargz {
    fn name(&self) -> &'static str {
        "eStargz"
    }

    fn toc_digest(
        &self,
        compression: Compression,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Result<Digest>> {
        (compression == Compression::Gzip)
            .then(|| toc_digest(annotations))
            .flatten()
    }

    fn footer_len(&self) -> u64 {
        FOOTER_SIZE
    }

    fn toc_range(
        &self,
        footer: &[u8],
        _: &BTreeMap<String, String>,
        size: u64,
    ) -> Result<std::ops::Range<u64>> {
        let toc_offset = parse_footer(footer)?;
        let end = size.saturating_sub(FOOTER_SIZE);
        if toc_offset >= end {
            return Err(bad("footer points past the TOC"));
        }
        if end - toc_offset > MAX_TOC_MEMBER {
            return Err(bad(format!(
                "its footer puts {} bytes of TOC before it",
                end - toc_offset
            )));
        }
        Ok(toc_offset..end)
    }

    fn toc_bytes(&self, stored: &[u8]) -> Result<Vec<u8>> {
        toc_json(stored)
    }

    fn parse(&self, toc: &[u8], toc_offset: u64) -> Result<TocLayer> {
        parse_toc(toc, toc_offset)
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
        decode_chunk(chunk, compressed)
    }
}

/// The most compressed TOC bytes fetched (the footer that says where the TOC starts is not
/// verified until the TOC is).
pub const MAX_TOC_MEMBER: u64 = 128 << 20;

/// The TOC JSON out of the TOC member (the bytes from its offset to the footer).
pub fn toc_json(member: &[u8]) -> Result<Vec<u8>> {
    let gz = super::GzipMembers::new(std::io::BufReader::new(member));
    let mut archive = tar::Archive::new(gz.take(MAX_TOC + 4096));
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("TOC member: {e}")))?;
    let mut item = entries
        .next()
        .ok_or_else(|| bad("TOC member holds no tar entry"))?
        .map_err(|e| bad(format!("TOC member: {e}")))?;
    let name = String::from_utf8_lossy(&item.path_bytes()).into_owned();
    if name != TOC_NAME {
        return Err(bad(format!("TOC member holds {name:?}, not {TOC_NAME}")));
    }
    if item.size() > MAX_TOC {
        return Err(bad(format!("TOC of {} bytes", item.size())));
    }
    let mut json = Vec::with_capacity(item.size() as usize);
    item.read_to_end(&mut json)
        .map_err(|e| bad(format!("TOC member: {e}")))?;
    Ok(json)
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

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| bad(format!("xattr value is not base64: {e}")))
}

/// Turn a verified TOC into a layer index and chunk table. `toc_offset` (the TOC member's
/// offset) ends the last chunk.
pub fn parse_toc(json: &[u8], toc_offset: u64) -> Result<TocLayer> {
    let toc: Toc = serde_json::from_slice(json).map_err(|e| bad(format!("TOC: {e}")))?;
    if toc.version != 1 {
        return Err(Error::Unsupported {
            what: "eStargz TOC version".into(),
            value: toc.version.to_string(),
        });
    }
    let starts = member_starts(&toc.entries, toc_offset)?;
    let mut out = TocLayer::default();
    let mut by_name: BTreeMap<bstr::BString, usize> = BTreeMap::new();
    let mut landmark_seen = false;
    for e in &toc.entries {
        let raw = e.name.trim_start_matches("./").trim_start_matches('/');
        if HIDDEN.contains(&raw.trim_end_matches('/')) {
            if raw == PREFETCH_LANDMARK {
                landmark_seen = true;
            }
            continue;
        }
        if e.kind == "chunk" {
            let path = index::normalize(raw.as_bytes())?;
            let &i = by_name
                .get(&path)
                .ok_or_else(|| bad(format!("chunk of {:?} before its file", e.name)))?;
            let chunk = later_chunk(e, out.index.entries[i].size, &starts)?;
            out.chunks[i].push(chunk);
            continue;
        }
        let entry = toc_entry(e, raw)?;
        let i = out.index.entries.len();
        let mut chunks = Vec::new();
        if entry.kind == Kind::File && e.size > 0 {
            chunks.push(first_chunk(e, &starts)?);
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
    check_tiling(&mut out)?;
    Ok(out)
}

/// Where each gzip member that holds file data starts, and the TOC's offset, in order:
/// every chunk ends where the next of them starts. Refuses layouts imgfs cannot read by
/// chunk (payloads sharing a member, two chunks at one offset).
fn member_starts(entries: &[TocEntry], toc_offset: u64) -> Result<Vec<u64>> {
    let mut starts: Vec<u64> = entries
        .iter()
        .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk")
        .map(|e| e.offset)
        .collect();
    if entries.iter().any(|e| e.inner_offset != 0) {
        return Err(Error::Unsupported {
            what: "eStargz layout".into(),
            value: "payloads sharing a gzip member (innerOffset)".into(),
        });
    }
    let data_count = starts.len();
    starts.push(toc_offset);
    starts.sort_unstable();
    starts.dedup();
    // Each chunk is its own member: two at one offset would be read one as the other.
    if starts.len() != data_count + 1 {
        return Err(bad("two chunks share an offset (or one sits at the TOC)"));
    }
    Ok(starts)
}

/// Where the chunk at `offset` ends: the next member start after it (see [`member_starts`]).
fn end_of(starts: &[u64], offset: u64) -> Result<u64> {
    let i = starts.partition_point(|&s| s <= offset);
    starts
        .get(i)
        .copied()
        .ok_or_else(|| bad(format!("chunk at {offset} lies past the TOC")))
}

/// The digest a chunk entry's bytes must have once decompressed.
fn chunk_digest(e: &TocEntry) -> Result<Digest> {
    let d = e.chunk_digest.as_deref().or(
        // A file in one chunk may carry only the whole file's digest.
        if e.chunk_offset == 0 && (e.chunk_size == 0 || e.chunk_size == e.size) {
            e.digest.as_deref()
        } else {
            None
        },
    );
    let d = d.ok_or_else(|| bad(format!("{:?}: a chunk without a digest", e.name)))?;
    Digest::parse(d).map_err(|_| bad(format!("{:?}: bad chunk digest {d:?}", e.name)))
}

/// The first chunk of a regular file, from its own entry (the whole file when its chunk
/// size is 0).
fn first_chunk(e: &TocEntry, starts: &[u64]) -> Result<Chunk> {
    let first = if e.chunk_size == 0 {
        e.size
    } else {
        e.chunk_size
    };
    Ok(Chunk {
        offset: e.offset,
        end: end_of(starts, e.offset)?,
        file_offset: 0,
        size: first,
        digest: chunk_digest(e)?,
    })
}

/// A later chunk of a file `size` bytes long, from a `chunk` entry (to the file's end when
/// its chunk size is 0).
fn later_chunk(e: &TocEntry, size: u64, starts: &[u64]) -> Result<Chunk> {
    let chunk_size = if e.chunk_size == 0 {
        size.saturating_sub(e.chunk_offset)
    } else {
        e.chunk_size
    };
    Ok(Chunk {
        offset: e.offset,
        end: end_of(starts, e.offset)?,
        file_offset: e.chunk_offset,
        size: chunk_size,
        digest: chunk_digest(e)?,
    })
}

/// The index entry of a TOC entry other than a chunk; `raw` is its name without a leading
/// `./` or `/`.
fn toc_entry(e: &TocEntry, raw: &str) -> Result<Entry> {
    let kind = match e.kind.as_str() {
        "dir" => Kind::Dir,
        "reg" => Kind::File,
        "symlink" => Kind::Symlink,
        "hardlink" => Kind::Hardlink,
        "char" => Kind::Char,
        "block" => Kind::Block,
        "fifo" => Kind::Fifo,
        other => return Err(bad(format!("{:?}: unknown entry type {other:?}", e.name))),
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
            xattrs.push((k.clone(), base64_decode(v)?));
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
fn check_tiling(out: &mut TocLayer) -> Result<()> {
    for (i, chunks) in out.chunks.iter_mut().enumerate() {
        chunks.sort_by_key(|c| c.file_offset);
        let mut at = 0;
        for c in chunks.iter() {
            if c.size > MAX_CHUNK {
                return Err(bad(format!(
                    "{:?}: a chunk of {} bytes (imgfs reads chunks up to {MAX_CHUNK})",
                    out.index.entries[i].path, c.size
                )));
            }
            if c.file_offset != at || c.end <= c.offset || c.end - c.offset > MAX_CHUNK {
                return Err(bad(format!(
                    "{:?}: chunks do not cover the file",
                    out.index.entries[i].path
                )));
            }
            at = at.saturating_add(c.size);
        }
        if !chunks.is_empty() && at != out.index.entries[i].size {
            return Err(bad(format!(
                "{:?}: chunks cover {at} of {} bytes",
                out.index.entries[i].path, out.index.entries[i].size
            )));
        }
    }
    Ok(())
}

/// The bytes of `chunk` from its fetched compressed bytes, verified against its digest.
pub fn decode_chunk(chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(chunk.size as usize);
    super::GzipMembers::new(compressed)
        .take(chunk.size)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("chunk at {}: {e}", chunk.offset)))?;
    let actual = Digest::of(&out);
    if out.len() as u64 != chunk.size || actual != chunk.digest {
        return Err(Error::DigestMismatch {
            what: format!("eStargz chunk at offset {}", chunk.offset),
            expected: chunk.digest.clone(),
            actual,
        });
    }
    Ok(out)
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

    #[test]
    fn a_footer_names_its_toc() {
        let mut f = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(b"00000000000012abSTARGZ");
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.len(), 51);
        assert_eq!(parse_footer(&f).unwrap(), 0x12ab);
        f[33] = b'X';
        assert!(parse_footer(&f).is_err());
    }

    fn toc(entries: &str) -> Vec<u8> {
        format!(r#"{{"version":1,"entries":[{entries}]}}"#).into_bytes()
    }

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_toc_becomes_entries_and_chunks() {
        let t = toc(&format!(
            r#"{{"name":"./","type":"dir","mode":493}},
               {{"name":"a/","type":"dir","mode":16877}},
               {{"name":"a/f","type":"reg","size":10,"offset":100,"chunkSize":6,"chunkDigest":"{D}","digest":"{D}"}},
               {{"name":"a/f","type":"chunk","offset":200,"chunkOffset":6,"chunkDigest":"{D}"}},
               {{"name":"a/.wh.g","type":"reg","digest":"{D}"}},
               {{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"digest":"{D}","chunkDigest":"{D}"}},
               {{"name":"l","type":"symlink","linkName":"a/f"}}"#
        ));
        let sg = parse_toc(&t, 400).unwrap();
        let paths: Vec<(&str, Kind)> = sg
            .index
            .entries
            .iter()
            .map(|e| (std::str::from_utf8(&e.path).unwrap(), e.kind))
            .collect();
        assert_eq!(
            paths,
            [
                ("", Kind::Dir),
                ("a", Kind::Dir),
                ("a/f", Kind::File),
                ("a/g", Kind::Whiteout),
                ("l", Kind::Symlink)
            ]
        );
        assert_eq!(sg.index.entries[1].mode, 0o755, "type bits masked");
        let c = &sg.chunks[2];
        assert_eq!((c[0].offset, c[0].end, c[0].size), (100, 200, 6));
        assert_eq!(
            (c[1].offset, c[1].end, c[1].file_offset, c[1].size),
            (200, 300, 6, 4)
        );
        assert_eq!(
            sg.prefetch,
            [2],
            "files (not whiteouts) before the landmark"
        );
    }

    #[test]
    fn hostile_tocs_are_refused() {
        let cases = [
            // a chunk bigger than imgfs reads whole
            format!(
                r#"{{"name":"f","type":"reg","size":1099511627776,"offset":10,"chunkDigest":"{D}"}}"#
            ),
            // chunks leave a gap
            format!(
                r#"{{"name":"f","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{D}"}},
                   {{"name":"f","type":"chunk","offset":20,"chunkOffset":6,"chunkDigest":"{D}"}}"#
            ),
            // data past the TOC
            format!(r#"{{"name":"f","type":"reg","size":10,"offset":5000,"chunkDigest":"{D}"}}"#),
            // a chunk of a file that is not there
            format!(r#"{{"name":"f","type":"chunk","offset":10,"chunkDigest":"{D}"}}"#),
            // a name that climbs out
            r#"{"name":"../../etc/passwd","type":"dir"}"#.to_string(),
            // no digest to check the bytes against
            r#"{"name":"f","type":"reg","size":10,"offset":10}"#.to_string(),
        ];
        for c in cases {
            assert!(parse_toc(&toc(&c), 400).is_err(), "{c}");
        }
    }
}
