//! zstd:chunked layers (containers/storage's lazy format): a zstd layer whose files (and
//! chunks of big files) are zstd frames of their own, with a table of contents — the TOC,
//! stargz's JSON schema — as a zstd frame inside a skippable frame near the blob's end. The
//! layer's annotations say where the TOC is and vouch for it: the manifest-position
//! (`offset:length:uncompressed length:type`) and the manifest-checksum (the sha256 of the
//! compressed TOC bytes). Keys of both generations are read: `io.containers.zstd-chunked.*`
//! (containers/storage up to 1.43 — Debian's skopeo 1.9 — and stargz-snapshotter's
//! ctr-remote) and `io.github.containers.zstd-chunked.*` (containers/storage 1.44 and later).
//!
//! The trust chain is eStargz's: manifest digest → annotation → TOC → chunk digests (sha256
//! of each chunk's uncompressed bytes). A chunk is read by decompressing its frame(s) from its
//! offset and taking exactly its size: ctr-remote's frames also hold the tar padding and
//! headers that follow a file. `zeros` chunks (holes, skopeo) are made here, not fetched.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::Compression;

use super::format::{Chunk, TocFormat, TocLayer};

const CHECKSUM_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
const POSITION_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
/// The TOC's own type in its position annotation (containers/storage's `ManifestTypeCRFS`).
const TOC_TYPE: u64 = 1;
/// The skippable frame header before the TOC's frame (magic, then the frame's length).
const SKIPPABLE_HEADER: u64 = 8;
/// The most compressed TOC bytes fetched, and the most TOC JSON decompressed.
const MAX_TOC: u64 = 256 << 20;

fn bad(reason: impl std::fmt::Display) -> Error {
    Error::malformed("zstd:chunked layer", reason)
}

/// The first of `keys` the annotations hold (the current name before the legacy one).
fn annotation<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&str],
) -> Option<(&'a str, &'a str)> {
    keys.iter()
        .find_map(|k| annotations.get_key_value(*k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

/// zstd:chunked as a [`TocFormat`].
pub struct ZstdChunked;

impl TocFormat for ZstdChunked {
    fn name(&self) -> &'static str {
        "zstd:chunked"
    }

    fn toc_digest(
        &self,
        compression: Compression,
        annotations: &BTreeMap<String, String>,
    ) -> Option<Result<Digest>> {
        if compression != Compression::Zstd {
            return None;
        }
        let (key, value) = annotation(annotations, &CHECKSUM_KEYS)?;
        Some(Digest::parse(value).map_err(|_| bad(format!("{key} is not a digest: {value:?}"))))
    }

    fn footer_len(&self) -> u64 {
        0
    }

    fn toc_range(
        &self,
        _footer: &[u8],
        annotations: &BTreeMap<String, String>,
        size: u64,
    ) -> Result<Range<u64>> {
        let (key, value) = annotation(annotations, &POSITION_KEYS)
            .ok_or_else(|| bad("no manifest-position annotation"))?;
        let fields: Vec<u64> = value
            .split(':')
            .map(|f| f.parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("{key} is not offset:length:length:type: {value:?}")))?;
        let [offset, length, _uncompressed, kind] = fields[..] else {
            return Err(bad(format!(
                "{key} is not offset:length:length:type: {value:?}"
            )));
        };
        if kind != TOC_TYPE {
            return Err(Error::Unsupported {
                what: "zstd:chunked TOC type".into(),
                value: kind.to_string(),
            });
        }
        if length == 0 || length > MAX_TOC {
            return Err(bad(format!("{key} gives a TOC of {length} bytes")));
        }
        match offset.checked_add(length) {
            Some(end) if offset >= SKIPPABLE_HEADER && end <= size => Ok(offset..end),
            _ => Err(bad(format!(
                "{key} puts the TOC at {offset}+{length}, past the blob's {size} bytes"
            ))),
        }
    }

    /// The checksum covers the TOC as stored (compressed).
    fn covered(&self, stored: &[u8]) -> Result<Vec<u8>> {
        Ok(stored.to_vec())
    }

    fn json(&self, covered: &[u8]) -> Result<Vec<u8>> {
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(covered)
            .and_then(|d| d.take(MAX_TOC + 1).read_to_end(&mut json))
            .map_err(|e| bad(format!("TOC: {e}")))?;
        if json.len() as u64 > MAX_TOC {
            return Err(bad(format!("a TOC of more than {MAX_TOC} bytes")));
        }
        Ok(json)
    }

    fn parse(&self, toc: &[u8], toc_offset: u64) -> Result<TocLayer> {
        // Chunk data ends before the skippable frame's header that holds the TOC.
        super::toc::parse(
            toc,
            toc_offset - SKIPPABLE_HEADER,
            &super::toc::ZSTD_CHUNKED,
        )
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(chunk.size as usize);
        zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(chunk.size).read_to_end(&mut out))
            .map_err(|e| bad(format!("chunk at {}: {e}", chunk.offset)))?;
        let actual = Digest::of(&out);
        if out.len() as u64 != chunk.size || actual != chunk.digest {
            return Err(Error::DigestMismatch {
                what: format!("zstd:chunked chunk at offset {}", chunk.offset),
                expected: chunk.digest.clone(),
                actual,
            });
        }
        Ok(out)
    }
}
