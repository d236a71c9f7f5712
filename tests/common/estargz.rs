//! A deterministic eStargz layer builder for tests, following stargz-snapshotter's
//! `docs/estargz.md` and the Go writer in `estargz/` (estargz.go, build.go, gzip.go, types.go),
//! plus [`self_check`], an independent reader that panics when a blob breaks the format.
//!
//! The blob is also an ordinary `tar+gzip` layer: eStargz-agnostic code must read it as one,
//! and `diff_id` is the sha256 of its whole uncompressed tar (the TOC entry included).

use std::collections::BTreeSet;
use std::io::{Read, Write};

use flate2::{Compression, GzBuilder};
use imgfs::digest::{Digest, Hasher};
use serde::Serialize;
use tar::{EntryType, Header};

/// The layer-descriptor annotation that carries [`Estargz::toc_digest`].
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
pub const TOC_NAME: &str = "stargz.index.json";
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// types.go `landmarkContents`: the landmark files hold this one byte.
pub const LANDMARK_CONTENTS: u8 = 0x0f;
pub const FOOTER_SIZE: usize = 51;
/// What the Go writer uses when the chunk size is not positive; `build(.., 0, ..)` does too.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;
/// 2024-01-01T00:00:00Z, the mtime of every entry the caller gives.
pub const MTIME: u64 = 1_704_067_200;
const MTIME_RFC3339: &str = "2024-01-01T00:00:00Z";

#[derive(Clone, Debug)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

#[derive(Clone)]
pub struct Estargz {
    pub blob: Vec<u8>,
    /// The TOC exactly as stored in the blob; `toc_digest` is its sha256.
    pub toc_json: Vec<u8>,
    pub toc_digest: Digest,
    /// sha256 of the whole uncompressed tar.
    pub diff_id: Digest,
    /// Compressed offset of the gzip member holding the TOC (what the footer points at).
    pub toc_offset: u64,
}

impl Estargz {
    /// The blob's own digest, for the layer descriptor.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.blob)
    }
}

/// The TOC JSON object. Field order and `omitempty` follow the Go `TOCEntry` json tags, so the
/// bytes match what stargz-snapshotter would write for the same entries. uid/gid (always 0
/// here), userName, groupName, devMajor, devMinor, xattrs and innerOffset are left out: Go
/// omits them when zero or empty, and this builder never makes them otherwise.
#[derive(Serialize)]
struct Toc {
    version: u32,
    entries: Vec<TocEntry>,
}

#[derive(Serialize, Default)]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    modtime: &'static str,
    #[serde(rename = "linkName", skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero32")]
    mode: u32,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(rename = "chunkOffset", skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(rename = "chunkSize", skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(rename = "chunkDigest", skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// Every key the Go `TOCEntry` may put in JSON; the check refuses others.
const TOC_ENTRY_KEYS: &[&str] = &[
    "name",
    "type",
    "size",
    "modtime",
    "linkName",
    "mode",
    "uid",
    "gid",
    "userName",
    "groupName",
    "offset",
    "innerOffset",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
];

#[derive(Clone, Debug)]
enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    Symlink(&'a str),
    Hardlink(&'a str),
}

/// One tar entry to write: `name` is what goes in the tar header and the TOC, `key` is the
/// cleaned path used to match names (Go's `cleanEntryName`).
#[derive(Clone, Debug)]
struct Item<'a> {
    name: String,
    key: String,
    mode: u32,
    mtime: u64,
    kind: Kind<'a>,
}

/// Go's `cleanEntryName`: `path.Clean("/"+name)` without the leading slash.
fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn parent(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(d, _)| d)
}

/// The entries as the Go builder's `importTar` sees them: a later entry with the same cleaned
/// name replaces the earlier one (and takes its own position), landmarks and the TOC name are
/// reserved and dropped.
fn import(entries: &[Entry]) -> Vec<Item<'_>> {
    let mut items: Vec<Item> = Vec::new();
    for e in entries {
        let (path, mode, kind) = match e {
            Entry::Dir { path, mode } => (path, *mode, Kind::Dir),
            Entry::File { path, mode, data } => (path, *mode, Kind::File(data)),
            Entry::Symlink { path, target } => (path, 0o777, Kind::Symlink(target)),
            // A hard link shares its target's inode, so its header carries the target's mode.
            Entry::Hardlink { path, target } => {
                let mode = items
                    .iter()
                    .find(|i| i.key == clean(target))
                    .map_or(0o644, |i| i.mode);
                (path, mode, Kind::Hardlink(target))
            }
        };
        let key = clean(path);
        if [TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&key.as_str()) {
            continue;
        }
        // Directories keep a trailing slash, as in Docker/BuildKit tars and the spec's example
        // TOC ("bin/"); the root directory becomes "./".
        let name = match (&kind, key.is_empty()) {
            (Kind::Dir, true) => "./".to_string(),
            (Kind::Dir, false) => format!("{key}/"),
            (_, true) => panic!("estargz: a non-directory entry needs a name: {e:?}"),
            (_, false) => key.clone(),
        };
        items.retain(|i| i.key != key);
        items.push(Item {
            name,
            key,
            mode,
            mtime: MTIME,
            kind,
        });
    }
    items
}

/// build.go `moveRec`: a prioritized entry drags its parent directories and, for a hard link,
/// its target ahead of it. Go fails when a parent or link target is missing from the tar; here
/// the missing ones are skipped, since test layers often omit parent directories.
fn move_rec<'a>(key: &str, rest: &mut Vec<Item<'a>>, out: &mut Vec<Item<'a>>) -> bool {
    if !key.is_empty() {
        if !rest.iter().chain(out.iter()).any(|i| i.key == key) {
            return false;
        }
        move_rec(parent(key), rest, out);
        let link = rest
            .iter()
            .find(|i| i.key == key)
            .and_then(|i| match i.kind {
                Kind::Hardlink(target) => Some(target),
                _ => None,
            });
        if let Some(target) = link {
            move_rec(&clean(target), rest, out);
        }
    }
    if let Some(at) = rest.iter().position(|i| i.key == key) {
        out.push(rest.remove(at));
    }
    true
}

/// build.go `sortEntries`: prioritized entries (in the given order) then `.prefetch.landmark`
/// then the rest; with nothing prioritized, `.no.prefetch.landmark` comes first.
fn order<'a>(mut rest: Vec<Item<'a>>, prioritized: &[&str]) -> Vec<Item<'a>> {
    let mut out = Vec::new();
    for p in prioritized {
        assert!(
            move_rec(&clean(p), &mut rest, &mut out),
            "estargz: prioritized file {p:?} is not among the entries"
        );
    }
    let landmark = if prioritized.is_empty() {
        NO_PREFETCH_LANDMARK
    } else {
        PREFETCH_LANDMARK
    };
    // The Go builder gives landmarks a bare header: mode 0 and a zero mtime, so their TOC
    // entries have neither "mode" nor "modtime".
    out.push(Item {
        name: landmark.to_string(),
        key: landmark.to_string(),
        mode: 0,
        mtime: 0,
        kind: Kind::File(&[LANDMARK_CONTENTS]),
    });
    out.extend(rest);
    out
}

/// Go's `compress/gzip` at BestCompression writes a 10-byte header with no flags, mtime 0,
/// XFL 2 and OS 255; flate2's builder writes the same bytes for the same settings.
fn gzip_member(data: &[u8]) -> Vec<u8> {
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// gzip.go `gzipFooterBytes`, spelled out byte by byte: Go makes it with a NoCompression
/// gzip writer, so XFL is 0, and the body is one empty final stored block.
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut f = Vec::with_capacity(FOOTER_SIZE);
    f.extend_from_slice(&[0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 255]); // FLG = FEXTRA
    f.extend_from_slice(&26u16.to_le_bytes()); // XLEN
    f.extend_from_slice(b"SG");
    f.extend_from_slice(&22u16.to_le_bytes());
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]); // BFINAL stored block, LEN 0
    f.extend_from_slice(&[0; 8]); // CRC32 and ISIZE of nothing
    f.try_into().unwrap()
}

/// Go's `json.MarshalIndent` escapes these inside strings; serde_json does not. Outside
/// strings they cannot occur in JSON, so a byte-level replace is exact.
fn go_json_escapes(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let mut i = 0;
    while i < json.len() {
        let (rep, used): (&[u8], usize) = match &json[i..] {
            [b'<', ..] => (b"\\u003c", 1),
            [b'>', ..] => (b"\\u003e", 1),
            [b'&', ..] => (b"\\u0026", 1),
            [0xe2, 0x80, 0xa8, ..] => (b"\\u2028", 3),
            [0xe2, 0x80, 0xa9, ..] => (b"\\u2029", 3),
            [b, ..] => (std::slice::from_ref(b), 1),
            [] => unreachable!(),
        };
        out.extend_from_slice(rep);
        i += used;
    }
    out
}

fn padded(n: usize) -> usize {
    n.div_ceil(512) * 512
}

/// Builds an eStargz blob holding `entries` (in order, after any `prioritized` paths and the
/// landmark), splitting file payloads into `chunk_size`-byte chunks (0 means 4 MiB).
pub fn build(entries: &[Entry], chunk_size: usize, prioritized: &[&str]) -> Estargz {
    let chunk_size = if chunk_size == 0 {
        DEFAULT_CHUNK_SIZE
    } else {
        chunk_size
    };
    let items = order(import(entries), prioritized);

    // The whole payload tar is written first; `cuts` are the uncompressed positions where the
    // Go writer closes one gzip member and opens the next (the start of every chunk), each with
    // the TOC entry that gets that member's compressed offset.
    let mut tar = tar::Builder::new(Vec::new());
    let mut toc: Vec<TocEntry> = Vec::new();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for item in &items {
        let mut h = Header::new_ustar();
        h.set_mode(item.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(item.mtime);
        h.set_size(0);
        let mut ent = TocEntry {
            name: item.name.clone(),
            mode: item.mode,
            modtime: if item.mtime == 0 { "" } else { MTIME_RFC3339 },
            ..TocEntry::default()
        };
        match item.kind {
            Kind::Dir => {
                h.set_entry_type(EntryType::Directory);
                tar.append_data(&mut h, &item.name, std::io::empty())
                    .unwrap();
                ent.kind = "dir";
                toc.push(ent);
            }
            Kind::Symlink(target) | Kind::Hardlink(target) => {
                let (et, kind) = match item.kind {
                    Kind::Symlink(_) => (EntryType::Symlink, "symlink"),
                    _ => (EntryType::Link, "hardlink"),
                };
                h.set_entry_type(et);
                tar.append_link(&mut h, &item.name, target).unwrap();
                ent.kind = kind;
                ent.link_name = target.to_string();
                toc.push(ent);
            }
            Kind::File(data) => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, &item.name, data).unwrap();
                let data_at = tar.get_ref().len() - padded(data.len());
                ent.kind = "reg";
                ent.size = data.len() as u64;
                // Go records the whole-file digest on every reg entry, empty files included.
                ent.digest = Digest::of(data).to_string();
                if data.is_empty() {
                    // No payload, so no member of its own: no offset, no chunk digest.
                    toc.push(ent);
                    continue;
                }
                let mut first = Some(ent);
                for (i, chunk) in data.chunks(chunk_size).enumerate() {
                    let mut c = first.take().unwrap_or_else(|| TocEntry {
                        name: item.name.clone(),
                        kind: "chunk",
                        ..TocEntry::default()
                    });
                    c.chunk_offset = (i * chunk_size) as u64;
                    // Go sets chunkSize whenever a full chunk_size was left to write, so a
                    // file of exactly N chunks has it on every entry, a single-chunk file
                    // shorter than chunk_size has none, and a short last chunk has none.
                    if chunk.len() == chunk_size {
                        c.chunk_size = chunk_size as u64;
                    }
                    c.chunk_digest = Digest::of(chunk).to_string();
                    cuts.push((data_at + i * chunk_size, toc.len()));
                    toc.push(c);
                }
            }
        }
    }
    // No end-of-archive here: the Go writer only flushes after each entry, and the two zero
    // blocks come after the TOC entry.
    let payload = std::mem::take(tar.get_mut());

    let mut blob = Vec::new();
    let mut from = 0;
    for &(cut, toc_index) in &cuts {
        blob.extend(gzip_member(&payload[from..cut]));
        toc[toc_index].offset = blob.len() as u64;
        from = cut;
    }
    blob.extend(gzip_member(&payload[from..]));

    let toc = Toc {
        version: 1,
        entries: toc,
    };
    let mut json = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut json,
        serde_json::ser::PrettyFormatter::with_indent(b"\t"),
    );
    toc.serialize(&mut ser).unwrap();
    let toc_json = go_json_escapes(&json);

    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0);
    h.set_mtime(0);
    h.set_size(toc_json.len() as u64);
    toc_tar
        .append_data(&mut h, TOC_NAME, &toc_json[..])
        .unwrap();
    let toc_tar = toc_tar.into_inner().unwrap();

    let toc_offset = blob.len() as u64;
    blob.extend(gzip_member(&toc_tar));
    blob.extend(footer_bytes(toc_offset));

    let mut diff = Hasher::new();
    diff.update(&payload);
    diff.update(&toc_tar);
    Estargz {
        blob,
        toc_digest: Digest::of(&toc_json),
        toc_json,
        diff_id: diff.finish(),
        toc_offset,
    }
}

// ---- self check ----

struct Member {
    /// Compressed offset of the member's gzip header.
    at: usize,
    /// Offset of its first byte in the concatenated uncompressed stream.
    out_at: usize,
    out: Vec<u8>,
}

/// Decodes the blob member by member (each one's CRC and length are checked by flate2).
fn split_members(blob: &[u8]) -> Vec<Member> {
    let mut members = Vec::new();
    let (mut at, mut out_at) = (0, 0);
    while at < blob.len() {
        let mut gz = flate2::bufread::GzDecoder::new(&blob[at..]);
        let mut out = Vec::new();
        gz.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("estargz: bad gzip member at {at}: {e}"));
        let used = blob.len() - at - gz.into_inner().len();
        assert!(used > 0, "estargz: gzip member at {at} used no input");
        let len = out.len();
        members.push(Member { at, out_at, out });
        at += used;
        out_at += len;
    }
    members
}

/// Reads the footer the way gzip.go `ParseFooter` does, without trusting our own writer.
fn parse_footer(f: &[u8]) -> u64 {
    assert_eq!(f.len(), FOOTER_SIZE);
    assert_eq!(&f[..3], &[0x1f, 0x8b, 8], "footer: not a gzip header");
    assert_eq!(f[3], 0x04, "footer: FLG must be exactly FEXTRA");
    assert_eq!(u16::from_le_bytes([f[10], f[11]]), 26, "footer: XLEN");
    assert_eq!(&f[12..14], b"SG", "footer: subfield id");
    assert_eq!(
        u16::from_le_bytes([f[14], f[15]]),
        22,
        "footer: subfield length"
    );
    assert_eq!(&f[32..38], b"STARGZ", "footer: magic");
    let hex = std::str::from_utf8(&f[16..32]).unwrap();
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "footer: offset {hex:?} is not lowercase hex"
    );
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    assert!(out.is_empty(), "footer: must decompress to nothing");
    u64::from_str_radix(hex, 16).unwrap()
}

struct TarEntry {
    header_at: usize,
    data_at: usize,
    name: String,
    kind: EntryType,
    link: Option<String>,
    mode: u32,
    mtime: u64,
    data: Vec<u8>,
}

fn tar_entries(stream: &[u8]) -> Vec<TarEntry> {
    let mut ar = tar::Archive::new(stream);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(TarEntry {
            header_at: e.raw_header_position() as usize,
            data_at: e.raw_file_position() as usize,
            name: String::from_utf8(e.path_bytes().into_owned()).unwrap(),
            kind: e.header().entry_type(),
            link: e
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap()),
            mode: e.header().mode().unwrap(),
            mtime: e.header().mtime().unwrap(),
            data,
        });
    }
    out
}

fn field<'v>(e: &'v serde_json::Value, k: &str) -> Option<&'v serde_json::Value> {
    e.get(k)
}

fn num(e: &serde_json::Value, k: &str) -> u64 {
    field(e, k).map_or(0, |v| {
        v.as_u64().unwrap_or_else(|| panic!("{k} not a u64: {e}"))
    })
}

fn text<'v>(e: &'v serde_json::Value, k: &str) -> &'v str {
    field(e, k).map_or("", |v| {
        v.as_str()
            .unwrap_or_else(|| panic!("{k} not a string: {e}"))
    })
}

/// Panics unless `e` is a well-formed eStargz blob holding exactly `entries` (as `build`
/// interprets them) plus one landmark and the TOC.
pub fn self_check(e: &Estargz, entries: &[Entry]) {
    let blob = &e.blob;
    assert!(
        blob.len() > FOOTER_SIZE,
        "estargz: blob shorter than a footer"
    );
    let footer_at = blob.len() - FOOTER_SIZE;
    assert_eq!(
        parse_footer(&blob[footer_at..]),
        e.toc_offset,
        "footer does not point at toc_offset"
    );
    assert_eq!(
        blob[footer_at..],
        footer_bytes(e.toc_offset),
        "footer bytes"
    );

    // Layout: payload members, then the TOC member, then the footer member.
    let members = split_members(blob);
    assert!(members.len() >= 3, "estargz: too few gzip members");
    let footer = &members[members.len() - 1];
    let toc_m = &members[members.len() - 2];
    assert_eq!(
        footer.at, footer_at,
        "the footer is not a member of its own"
    );
    assert_eq!(
        toc_m.at as u64, e.toc_offset,
        "footer offset is not the TOC member"
    );

    let stream: Vec<u8> = members.iter().flat_map(|m| m.out.iter().copied()).collect();
    assert_eq!(Digest::of(&stream), e.diff_id, "diff_id");
    assert_eq!(Digest::of(&e.toc_json), e.toc_digest, "toc_digest");

    // The TOC member alone is a tar: the TOC entry, then end-of-archive, nothing else.
    let alone = tar_entries(&toc_m.out);
    assert_eq!(alone.len(), 1, "TOC member must hold exactly one tar entry");
    assert_eq!(alone[0].name, TOC_NAME);
    assert_eq!(alone[0].header_at, 0, "TOC header must start its member");
    assert_eq!(
        alone[0].data, e.toc_json,
        "stored TOC differs from toc_json"
    );
    let toc_end = alone[0].data_at + padded(alone[0].data.len());
    assert_eq!(
        toc_m.out.len(),
        toc_end + 1024,
        "TOC member must end with the tar trailer"
    );
    assert!(
        toc_m.out[alone[0].data_at + alone[0].data.len()..]
            .iter()
            .all(|&b| b == 0)
    );

    // The whole stream is one tar ending with the TOC entry.
    let tar = tar_entries(&stream);
    let (toc_entry, tar) = tar.split_last().expect("estargz: empty tar");
    assert_eq!(
        toc_entry.name, TOC_NAME,
        "the TOC must be the last tar entry"
    );
    assert_eq!(
        toc_entry.header_at, toc_m.out_at,
        "TOC header must start the TOC member"
    );

    let toc: serde_json::Value = serde_json::from_slice(&e.toc_json).expect("TOC is not JSON");
    assert_eq!(toc["version"], 1, "TOC version");
    let toc_entries = toc["entries"].as_array().expect("TOC entries");
    for t in toc_entries {
        for k in t.as_object().expect("TOC entry is not an object").keys() {
            assert!(TOC_ENTRY_KEYS.contains(&k.as_str()), "unknown TOC key {k}");
        }
    }

    // Walk the TOC beside the tar: every non-chunk TOC entry is the next tar entry, and a
    // reg entry's chunks follow it.
    let mut expected_starts: BTreeSet<usize> = [0, toc_m.at, footer_at].into();
    let mut offsets = BTreeSet::new();
    let mut ti = 0;
    for te in tar {
        let t = toc_entries
            .get(ti)
            .unwrap_or_else(|| panic!("TOC ends before tar entry {}", te.name));
        ti += 1;
        assert_eq!(text(t, "name"), te.name, "TOC/tar order");
        let kind = match te.kind {
            EntryType::Directory => "dir",
            EntryType::Regular => "reg",
            EntryType::Symlink => "symlink",
            EntryType::Link => "hardlink",
            k => panic!("unexpected tar entry type {k:?} for {}", te.name),
        };
        assert_eq!(text(t, "type"), kind, "type of {}", te.name);
        assert_eq!(num(t, "mode"), u64::from(te.mode), "mode of {}", te.name);
        let modtime = if te.mtime == 0 { "" } else { MTIME_RFC3339 };
        assert!(te.mtime == 0 || te.mtime == MTIME, "mtime of {}", te.name);
        assert_eq!(text(t, "modtime"), modtime, "modtime of {}", te.name);
        assert_eq!(num(t, "uid") + num(t, "gid"), 0, "owner of {}", te.name);
        assert_eq!(
            text(t, "linkName"),
            te.link.as_deref().unwrap_or(""),
            "linkName of {}",
            te.name
        );
        if kind != "reg" {
            for k in ["size", "offset", "digest", "chunkDigest", "chunkSize"] {
                assert!(field(t, k).is_none(), "{k} on non-file {}", te.name);
            }
            continue;
        }
        let data = &te.data;
        assert_eq!(num(t, "size"), data.len() as u64, "size of {}", te.name);
        assert_eq!(
            text(t, "digest"),
            Digest::of(data).as_str(),
            "digest of {}",
            te.name
        );
        if data.is_empty() {
            for k in ["offset", "chunkDigest", "chunkSize", "chunkOffset"] {
                assert!(field(t, k).is_none(), "{k} on empty file {}", te.name);
            }
            continue;
        }
        // The chunks: this reg entry, then the chunk entries right after it.
        let mut chunks = vec![t];
        while let Some(c) = toc_entries.get(ti).filter(|c| text(c, "type") == "chunk") {
            assert_eq!(text(c, "name"), te.name, "chunk entry name");
            for k in ["size", "modtime", "mode", "digest", "linkName"] {
                assert!(field(c, k).is_none(), "{k} on a chunk of {}", te.name);
            }
            chunks.push(c);
            ti += 1;
        }
        let mut covered = 0usize;
        for (n, c) in chunks.iter().enumerate() {
            let last = n + 1 == chunks.len();
            let chunk_offset = num(c, "chunkOffset") as usize;
            assert_eq!(
                chunk_offset, covered,
                "chunks of {} are not contiguous",
                te.name
            );
            // chunkSize 0 means "to the end of the file" (estargz.go initFields).
            let len = match num(c, "chunkSize") as usize {
                0 => {
                    assert!(
                        last,
                        "only the last chunk of {} may omit chunkSize",
                        te.name
                    );
                    data.len() - chunk_offset
                }
                n => n,
            };
            let want = &data[chunk_offset..chunk_offset + len];
            assert_eq!(
                text(c, "chunkDigest"),
                Digest::of(want).as_str(),
                "chunkDigest of {} at {chunk_offset}",
                te.name
            );
            let offset = num(c, "offset") as usize;
            assert!(offsets.insert(offset), "offset {offset} used twice");
            expected_starts.insert(offset);
            let m = members
                .iter()
                .find(|m| m.at == offset)
                .unwrap_or_else(|| panic!("offset {offset} of {} is not a member", te.name));
            assert_eq!(
                m.out_at,
                te.data_at + chunk_offset,
                "member at {offset} does not start with chunk {chunk_offset} of {}",
                te.name
            );
            // What a lazy reader does: inflate from the offset and take the chunk's bytes.
            let mut got = vec![0; len];
            flate2::read::MultiGzDecoder::new(&blob[offset..])
                .read_exact(&mut got)
                .unwrap();
            assert!(
                got == want,
                "bytes at offset {offset} are not chunk {chunk_offset} of {}",
                te.name
            );
            if !last {
                assert_eq!(
                    m.out.len(),
                    len,
                    "non-final chunk member must hold only the chunk"
                );
            }
            covered += len;
        }
        assert_eq!(covered, data.len(), "chunks of {} do not cover it", te.name);
    }
    assert_eq!(ti, toc_entries.len(), "TOC has entries the tar lacks");
    let starts: BTreeSet<usize> = members.iter().map(|m| m.at).collect();
    assert_eq!(starts, expected_starts, "gzip members that start no chunk");

    // Landmark: exactly one, holding 0x0f; the no-prefetch one comes first.
    let landmarks: Vec<(usize, &TarEntry)> = tar
        .iter()
        .enumerate()
        .filter(|(_, t)| t.name == PREFETCH_LANDMARK || t.name == NO_PREFETCH_LANDMARK)
        .collect();
    assert_eq!(landmarks.len(), 1, "exactly one landmark");
    let (at, lm) = landmarks[0];
    assert_eq!(lm.kind, EntryType::Regular);
    assert_eq!(lm.data, [LANDMARK_CONTENTS], "landmark contents");
    if lm.name == NO_PREFETCH_LANDMARK {
        assert_eq!(at, 0, "{NO_PREFETCH_LANDMARK} must be the first entry");
    }

    // The caller's entries, each once, as given.
    let items = import(entries);
    assert_eq!(tar.len(), items.len() + 1, "tar entry count");
    for item in &items {
        let found: Vec<&TarEntry> = tar.iter().filter(|t| t.name == item.name).collect();
        assert_eq!(
            found.len(),
            1,
            "{} appears {} times",
            item.name,
            found.len()
        );
        let t = found[0];
        assert_eq!(t.mode, item.mode, "mode of {}", item.name);
        match item.kind {
            Kind::Dir => assert_eq!(t.kind, EntryType::Directory, "{}", item.name),
            Kind::File(data) => {
                assert_eq!(t.kind, EntryType::Regular, "{}", item.name);
                assert!(t.data == data, "contents of {}", item.name);
            }
            Kind::Symlink(target) => {
                assert_eq!(t.kind, EntryType::Symlink, "{}", item.name);
                assert_eq!(t.link.as_deref(), Some(target), "{}", item.name);
            }
            Kind::Hardlink(target) => {
                assert_eq!(t.kind, EntryType::Link, "{}", item.name);
                assert_eq!(t.link.as_deref(), Some(target), "{}", item.name);
            }
        }
    }
}
