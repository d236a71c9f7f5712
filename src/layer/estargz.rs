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

use super::format::{Chunk, TocFormat, TocLayer};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::Compression;

/// The layer annotation holding the sha256 of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The footer: an empty gzip member whose extra field holds the TOC's offset.
pub const FOOTER_SIZE: u64 = 51;
const TOC_NAME: &str = "stargz.index.json";
/// A TOC bigger than this is not one we will parse (a few hundred bytes per file).
const MAX_TOC: u64 = 256 << 20;

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

    /// The TOC digest covers the JSON, out of its gzip member.
    fn covered(&self, stored: &[u8]) -> Result<Vec<u8>> {
        toc_json(stored)
    }

    fn json(&self, covered: &[u8]) -> Result<Vec<u8>> {
        Ok(covered.to_vec())
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

/// An eStargz TOC as a layer index and chunk tables (`super::toc`); `toc_offset` (the TOC
/// member's offset) ends the last chunk.
pub fn parse_toc(json: &[u8], toc_offset: u64) -> Result<TocLayer> {
    super::toc::parse(json, toc_offset, &super::toc::ESTARGZ)
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
    use crate::index::Kind;

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
