//! The on-disk form of a [`LayerIndex`]: compact (paths share prefixes with the previous entry,
//! integers are varints via postcard), versioned and checksummed, so a damaged or outdated
//! file is detected and rebuilt rather than trusted.
//!
//! Layout: `IMGFSIDX` · format version (u32 LE) · the layer's digest (32 raw sha256 bytes) ·
//! sha256 of the payload (32 bytes) · payload, the payload zstd-compressed (the 32 KiB
//! seek-point windows are most of it and compress well, as do the prefix-shared paths).
//!
//! The index names the layer it describes, so that one fetched from elsewhere (a registry
//! artifact, see `crate::artifact`) or found under the wrong name is refused, not applied
//! to another layer's bytes. This is also the format published as an index artifact
//! (docs/index-artifact.md): change it only with a version bump and a note there.

use bstr::{BString, ByteSlice};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Entry, Kind, LayerIndex};
use crate::digest::Digest;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"IMGFSIDX";
/// Bump when the payload changes shape; older files are then rebuilt.
/// (6: span digests are BLAKE3, not sha256; 7: names are bytes, sparse maps.)
pub const VERSION: u32 = 7;
/// The version field of a slim index (`index::windows`): the same payload, each window
/// replaced by its digest. A number of its own, so that nothing reads one as a full index
/// (a digest used as a window would decompress to wrong bytes).
pub const SLIM_VERSION: u32 = 0x8000_0000 | VERSION;
/// Magic, version, layer digest, payload checksum.
const HEADER: usize = 8 + 4 + 32 + 32;

#[derive(Serialize, Deserialize)]
struct Payload<'a> {
    // Borrowed from the decompressed payload: decoding allocates each path once.
    #[serde(borrow)]
    entries: Vec<Enc<'a>>,
    seek: Option<crate::index::SeekPoints>,
}

#[derive(Serialize, Deserialize)]
struct Enc<'a> {
    /// Bytes shared with the previous entry's path.
    shared: u32,
    #[serde(borrow, with = "serde_bytes")]
    suffix: std::borrow::Cow<'a, [u8]>,
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    #[serde(with = "serde_bytes")]
    link: Option<Vec<u8>>,
    dev: Option<(u32, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
    /// Data offset minus the previous entry's (offsets grow through a tar).
    offset_delta: i64,
    /// A sparse file's data regions: (offset in the file, length).
    sparse: Vec<(u64, u64)>,
}

fn kind_code(k: Kind) -> u8 {
    match k {
        Kind::Dir => 0,
        Kind::File => 1,
        Kind::Symlink => 2,
        Kind::Hardlink => 3,
        Kind::Char => 4,
        Kind::Block => 5,
        Kind::Fifo => 6,
        Kind::Whiteout => 7,
        Kind::Opaque => 8,
    }
}

fn code_kind(c: u8) -> Option<Kind> {
    Some(match c {
        0 => Kind::Dir,
        1 => Kind::File,
        2 => Kind::Symlink,
        3 => Kind::Hardlink,
        4 => Kind::Char,
        5 => Kind::Block,
        6 => Kind::Fifo,
        7 => Kind::Whiteout,
        8 => Kind::Opaque,
        _ => return None,
    })
}

/// Serialise the index of `layer`.
pub fn encode(layer: &Digest, index: &LayerIndex) -> Vec<u8> {
    frame_as(layer, &payload_of(index), VERSION)
}

/// Serialise a slim index of `layer` (`index::windows::slim`: its windows are digests),
/// pinned to its windows blob `windows`: that blob's sha256 ends the payload, so that the
/// index is never used with another.
pub fn encode_slim(layer: &Digest, slim: &LayerIndex, windows: &Digest) -> Vec<u8> {
    let mut payload = payload_of(slim);
    payload.extend_from_slice(&hex::decode(windows.hex()).expect("a digest is hex"));
    frame_as(layer, &payload, SLIM_VERSION)
}

fn payload_of(index: &LayerIndex) -> Vec<u8> {
    // An index taken apart from its windows has none to write: encoded as a full one, its
    // reads would fail.
    debug_assert!(
        index
            .seek
            .as_ref()
            .is_none_or(|s| s.windows_apart.is_none()),
        "encoding an index whose windows are apart"
    );
    let mut prev_path: &[u8] = b"";
    let mut prev_offset = 0i64;
    let entries = index
        .entries
        .iter()
        .map(|e| {
            let shared = prev_path
                .iter()
                .zip(e.path.iter())
                .take_while(|(a, b)| a == b)
                .count();
            let enc = Enc {
                shared: shared as u32,
                suffix: std::borrow::Cow::Borrowed(&e.path[shared..]),
                kind: kind_code(e.kind),
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                size: e.size,
                mtime: e.mtime,
                link: e.link.as_ref().map(|l| l.to_vec()),
                dev: matches!(e.kind, Kind::Char | Kind::Block)
                    .then_some((e.dev_major, e.dev_minor)),
                xattrs: e.xattrs.clone(),
                offset_delta: e.offset as i64 - prev_offset,
                sparse: e.sparse.iter().map(|r| (r.offset, r.len)).collect(),
            };
            prev_path = &e.path;
            prev_offset = e.offset as i64;
            enc
        })
        .collect();
    postcard::to_allocvec(&Payload {
        entries,
        seek: index.seek.clone(),
    })
    .expect("encoding to memory cannot fail")
}

/// The file for a serialised payload of `layer`'s index: header, checksum, compressed
/// payload. (Public for the fuzzer, which makes payloads of its own.)
pub fn frame(layer: &Digest, payload: &[u8]) -> Vec<u8> {
    frame_as(layer, payload, VERSION)
}

fn frame_as(layer: &Digest, payload: &[u8], version: u32) -> Vec<u8> {
    let payload = zstd::bulk::compress(payload, 3).expect("compressing in memory cannot fail");
    let mut out = Vec::with_capacity(payload.len() + HEADER);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&hex::decode(layer.hex()).expect("a digest is hex"));
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// The layer an encoded index says it describes (`None` if `bytes` is not a current index).
pub fn layer_of(bytes: &[u8]) -> Option<Digest> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC || bytes[8..12] != VERSION.to_le_bytes() {
        return None;
    }
    Digest::parse(&format!("sha256:{}", hex::encode(&bytes[12..44]))).ok()
}

/// A slim index (`index::windows`), for [`decode_slim`].
pub fn is_slim(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER && is_slim_header(bytes)
}

/// Whether `head` (an index's first 12 bytes at least) is a slim index's magic and version.
pub fn is_slim_header(head: &[u8]) -> bool {
    head.len() >= 12 && &head[..8] == MAGIC && head[8..12] == SLIM_VERSION.to_le_bytes()
}

/// An imgfs index of a format version other than this one's.
pub fn is_other_version(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER && &bytes[..8] == MAGIC && bytes[8..12] != VERSION.to_le_bytes()
}

/// Deserialise the index of `layer`, refusing anything damaged, truncated, of another
/// version, or describing another layer.
pub fn decode(layer: &Digest, bytes: &[u8]) -> Result<LayerIndex> {
    parse_payload(&unframe(layer, bytes, VERSION)?)
}

/// Deserialise a slim index of `layer` (its windows are digests: see `index::windows`),
/// refusing a full one as [`decode`] refuses a slim one; with the windows blob it is pinned
/// to.
pub fn decode_slim(layer: &Digest, bytes: &[u8]) -> Result<(LayerIndex, Digest)> {
    let payload = unframe(layer, bytes, SLIM_VERSION)?;
    let at = payload
        .len()
        .checked_sub(32)
        .ok_or_else(|| bad("a slim index without its windows blob's digest"))?;
    let windows = Digest::parse(&format!("sha256:{}", hex::encode(&payload[at..])))
        .map_err(|_| bad("a slim index without its windows blob's digest"))?;
    Ok((parse_payload(&payload[..at])?, windows))
}

fn parse_payload(payload: &[u8]) -> Result<LayerIndex> {
    let p: Payload = postcard::from_bytes(payload).map_err(|e| bad(&e.to_string()))?;
    if let Some(sp) = &p.seek {
        check_seek_points(sp)?;
    }
    // Shared prefixes let a small file describe huge paths; real indexes hold a few path
    // bytes per payload byte.
    let mut path_budget = payload.len().saturating_mul(16).saturating_add(16 << 20);
    let mut entries: Vec<Entry> = Vec::with_capacity(p.entries.len());
    let mut prev_offset = 0i64;
    for enc in p.entries {
        let prev_path: &[u8] = entries.last().map_or(b"", |e| e.path.as_slice());
        let entry = decode_entry(enc, prev_path, prev_offset, &mut path_budget)?;
        prev_offset = entry.offset as i64;
        entries.push(entry);
    }
    Ok(LayerIndex {
        entries,
        seek: p.seek,
    })
}

fn bad(reason: &str) -> Error {
    Error::malformed("layer index", reason)
}

/// The decompressed payload of `bytes`, once its magic, version, layer and checksum are
/// right.
fn unframe(layer: &Digest, bytes: &[u8], wanted: u32) -> Result<Vec<u8>> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(bad("not an imgfs index (bad magic or too short)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != wanted {
        let shown = |v: u32| match v & SLIM_VERSION & !VERSION {
            0 => v.to_string(),
            flag => format!("{} (slim)", v & !flag),
        };
        return Err(bad(&format!(
            "format version {}, this imgfs reads {} here",
            shown(version),
            shown(wanted)
        )));
    }
    let described = Digest::parse(&format!("sha256:{}", hex::encode(&bytes[12..44])))
        .map_err(|_| bad("no layer digest"))?;
    if &described != layer {
        return Err(bad(&format!("it describes layer {described}, not {layer}")));
    }
    let payload = &bytes[HEADER..];
    if Sha256::digest(payload).as_slice() != &bytes[44..HEADER] {
        return Err(bad("checksum mismatch"));
    }
    // The frame declares its size (we always write it); cap it against a hostile file.
    let size = zstd::zstd_safe::get_frame_content_size(payload)
        .ok()
        .flatten()
        .filter(|&n| n <= 1 << 30)
        .ok_or_else(|| bad("payload size missing or too large"))?;
    zstd::bulk::decompress(payload, size as usize).map_err(|e| bad(&e.to_string()))
}

/// Seek points as readers rely on them: one digest per checkpoint, checkpoints in order
/// (readers index one by the other, and walk checkpoints by offset), each one possible.
fn check_seek_points(sp: &crate::index::SeekPoints) -> Result<()> {
    let ordered = sp
        .checkpoints
        .windows(2)
        .all(|w| w[0].out_offset < w[1].out_offset && w[0].in_offset < w[1].in_offset);
    let sane = sp
        .checkpoints
        .iter()
        .all(|c| c.bits < 8 && (c.bits == 0 || c.in_offset > 0) && c.window.len() <= 32 << 10);
    if sp.checkpoints.len() != sp.span_digests.len() || !ordered || !sane {
        return Err(bad("inconsistent seek points"));
    }
    Ok(())
}

/// One entry, from its encoding and the entry before it (`prev_path`, `prev_offset`), held
/// to what the indexer writes. Its path is charged to `path_budget`.
fn decode_entry(
    enc: Enc,
    prev_path: &[u8],
    prev_offset: i64,
    path_budget: &mut usize,
) -> Result<Entry> {
    let path = entry_path(prev_path, enc.shared as usize, &enc.suffix, path_budget)?;
    let kind = code_kind(enc.kind).ok_or_else(|| bad("unknown entry kind"))?;
    // What the indexer writes: normalised, whiteouts decoded (a directory `.wh.x/` is a
    // whiteout, but `.wh.x/y` puts `y` in a directory of that name). Anything else was
    // not written by it (an index from a registry is not trusted to be well-formed).
    let normal = path.is_empty()
        || path
            .split_str("/")
            .all(|c| !c.is_empty() && c != b"." && c != b"..");
    let decoded = matches!(kind, Kind::Whiteout | Kind::Opaque)
        || !crate::index::split(&path).1.starts_with(b".wh.");
    if !normal || !decoded {
        return Err(bad(&format!("entry path {path:?} is not normalised")));
    }
    let mut sparse = Vec::with_capacity(enc.sparse.len());
    let mut end = 0u64;
    for (offset, len) in enc.sparse {
        let r_end = offset.checked_add(len).filter(|e| *e <= enc.size);
        if kind != Kind::File || offset < end || r_end.is_none() {
            return Err(bad(&format!("entry {path:?}: inconsistent sparse map")));
        }
        end = r_end.unwrap_or(0);
        sparse.push(crate::index::Region { offset, len });
    }
    let offset = prev_offset + enc.offset_delta;
    if offset < 0 {
        return Err(bad("negative data offset"));
    }
    let (dev_major, dev_minor) = enc.dev.unwrap_or((0, 0));
    Ok(Entry {
        path,
        kind,
        mode: enc.mode,
        uid: enc.uid,
        gid: enc.gid,
        size: enc.size,
        mtime: enc.mtime,
        link: enc.link.map(BString::from),
        dev_major,
        dev_minor,
        xattrs: enc.xattrs,
        offset: offset as u64,
        sparse,
    })
}

/// A path: the first `shared` bytes of `prev_path`, then `suffix`; refused past 4096 bytes
/// or past what is left of `budget`, which it is charged to.
fn entry_path(
    prev_path: &[u8],
    shared: usize,
    suffix: &[u8],
    budget: &mut usize,
) -> Result<BString> {
    if shared > prev_path.len() {
        return Err(bad("path prefix out of range"));
    }
    let len = shared + suffix.len();
    if len > 4096 || len > *budget {
        return Err(bad("paths longer than any layer's"));
    }
    *budget -= len;
    let mut path = Vec::with_capacity(len);
    path.extend_from_slice(&prev_path[..shared]);
    path.extend_from_slice(suffix);
    Ok(BString::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> crate::digest::Digest {
        crate::digest::Digest::of(b"the layer")
    }

    fn sample() -> LayerIndex {
        let e = |path: &[u8], kind: Kind, offset: u64| Entry {
            path: BString::from(path),
            kind,
            mode: 0o4755,
            uid: 1000,
            gid: 50,
            size: 12,
            mtime: -5,
            link: (kind == Kind::Symlink).then(|| BString::from(&b"../\xff/target"[..])),
            dev_major: if kind == Kind::Char { 1 } else { 0 },
            dev_minor: if kind == Kind::Char { 3 } else { 0 },
            xattrs: vec![("user.x".into(), vec![0, 1, 2])],
            offset,
            sparse: if kind == Kind::File {
                vec![crate::index::Region { offset: 4, len: 8 }]
            } else {
                Vec::new()
            },
        };
        LayerIndex {
            seek: Some(crate::index::SeekPoints {
                checkpoints: vec![crate::index::seek_points::Checkpoint {
                    in_offset: 10,
                    bits: 3,
                    out_offset: 4 << 20,
                    window: vec![7; 100],
                }],
                span_digests: vec![crate::digest::SpanDigest::of(b"span")],
                windows_apart: None,
            }),
            entries: vec![
                e(b"usr", Kind::Dir, 512),
                e("usr/lib/ü/libé.so".as_bytes(), Kind::File, 1536),
                // Latin-1, not UTF-8: kept as the bytes they are.
                e(b"usr/lib/\xfc/lib\xe9.so", Kind::Symlink, 3072),
                e(b".wh.d/x", Kind::Fifo, 3100),
                e(b"dev/null", Kind::Char, 3584),
                e(b"opq", Kind::Opaque, 4096),
            ],
        }
    }

    #[test]
    fn round_trips_exactly() {
        let idx = sample();
        let back = decode(&layer(), &encode(&layer(), &idx)).unwrap();
        assert_eq!(back.entries, idx.entries);
        assert_eq!(back.seek, idx.seek);
    }

    #[test]
    fn windows_encode_as_the_byte_sequence_they_were_before_serde_bytes() {
        // `serde_bytes` only speeds decoding up: postcard writes bytes and a sequence of
        // u8 alike, so indexes written before it still decode.
        let cp = crate::index::seek_points::Checkpoint {
            in_offset: 300,
            bits: 3,
            out_offset: 70_000,
            window: (0..=255u8).cycle().take(1000).collect(),
        };
        let as_seq = (cp.in_offset, cp.bits, cp.out_offset, cp.window.clone());
        assert_eq!(
            postcard::to_allocvec(&cp).unwrap(),
            postcard::to_allocvec(&as_seq).unwrap()
        );
        let back: crate::index::seek_points::Checkpoint =
            postcard::from_bytes(&postcard::to_allocvec(&as_seq).unwrap()).unwrap();
        assert_eq!(back, cp);
    }

    #[test]
    fn another_version_is_told_from_damage() {
        let good = encode(&layer(), &sample());
        let mut old = good.clone();
        old[8] = 5;
        assert!(is_other_version(&old) && !is_other_version(&good));
        assert!(!is_other_version(b"garbage"));
    }

    #[test]
    fn damage_of_any_kind_is_detected() {
        let good = encode(&layer(), &sample());
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        for (bytes, want) in [
            (flipped, "checksum"),
            (good[..good.len() - 1].to_vec(), "checksum"),
            (b"garbage".to_vec(), "magic"),
            (
                {
                    let mut v = good.clone();
                    v[8] = 99;
                    v
                },
                "version 99",
            ),
        ] {
            let e = decode(&layer(), &bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for (path, want) in [
            ("a/../../etc", "not normalised"),
            ("a//b", "not normalised"),
            ("d/.wh.x", "not normalised"),
            (&"x".repeat(5000), "longer"),
        ] {
            let mut idx = sample();
            idx.entries[1].path = path.into();
            let e = decode(&layer(), &encode(&layer(), &idx))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{path}: {e}");
        }
        // Many entries each sharing a long prefix: small file, huge paths.
        let mut idx = sample();
        let long = "p/".repeat(2000);
        idx.entries = (0..8_000)
            .map(|i| Entry {
                path: format!("{long}{i}").into(),
                ..sample().entries[1].clone()
            })
            .collect();
        let bytes = encode(&layer(), &idx);
        assert!(bytes.len() < 200_000, "{}", bytes.len());
        let e = decode(&layer(), &bytes).unwrap_err().to_string();
        assert!(e.contains("longer"), "{e}");
    }

    #[test]
    fn an_index_of_another_layer_is_refused() {
        let other = crate::digest::Digest::of(b"another layer");
        let bytes = encode(&other, &sample());
        assert_eq!(layer_of(&bytes), Some(other.clone()));
        let e = decode(&layer(), &bytes).unwrap_err().to_string();
        assert!(e.contains(&format!("describes layer {other}")), "{e}");
    }
}
