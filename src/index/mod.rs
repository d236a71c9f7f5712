//! The table of contents of one layer: every tar entry with its metadata and where its data
//! starts in the uncompressed stream, built by streaming the layer once. Whiteouts are
//! recognised here, so that `tree` deals in overlay operations rather than file names.
//!
//! Paths are normalised on the way in (`./x`, `/x` and `x` are one path; `.` and `//` vanish;
//! `..` that would climb out of the image root is refused), so no later stage sees them raw.

pub mod codec;
pub mod seek_points;
pub mod tarstream;
pub mod windows;

pub use seek_points::SeekPoints;
pub use tarstream::{Limits, Region};

use std::io::Read;

use bstr::{BStr, BString, ByteSlice};

use crate::error::{Error, Result};

/// What an entry is, with whiteouts already decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A hard link to `link`, a path in this layer or below.
    Hardlink,
    Char,
    Block,
    Fifo,
    /// `.wh.NAME`: `path` (NAME's path) and its subtree are deleted from lower layers.
    Whiteout,
    /// `.wh..wh..opq`: the lower layers' children of directory `path` are hidden.
    Opaque,
}

/// One tar entry. Names are bytes, as tar and Linux have them: nothing forces UTF-8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalised: relative, `/`-separated, no `.`/`..`/empty components; `""` is the root.
    pub path: BString,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The file's size (for a sparse file, with its holes).
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Symlink target as written, or the normalised path a hardlink points at.
    pub link: Option<BString>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Where the entry's data starts in the uncompressed tar stream.
    pub offset: u64,
    /// For a sparse file, the regions that hold data, stored one after another from
    /// `offset`; the rest of the file reads as zeros (one empty region at the end when none
    /// holds data). Empty for every other entry.
    pub sparse: Vec<Region>,
}

impl Entry {
    /// Bytes of the tar stream that hold this entry's data, from `offset`.
    pub fn stored_len(&self) -> u64 {
        if self.sparse.is_empty() {
            self.size
        } else {
            self.sparse.iter().map(|r| r.len).sum()
        }
    }
}

/// All entries of a layer, in tar order, and (for gzip layers indexed for mounting) the seek
/// points that let any byte range of the uncompressed tar be produced cheaply.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    pub entries: Vec<Entry>,
    /// Gzip seek points and span digests; `None` when not recorded.
    pub seek: Option<SeekPoints>,
}

/// Normalise a tar path.
pub fn normalize(raw: &[u8]) -> Result<BString> {
    // Linux's PATH_MAX; longer names can only be hostile, and depth costs the tree work.
    if raw.len() > 4096 {
        return Err(Error::malformed(
            "layer",
            format!("entry name of {} bytes (longer than 4096)", raw.len()),
        ));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for comp in raw.split_str("/") {
        match comp {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(Error::malformed(
                        "layer",
                        format!("entry {:?} climbs out of the image root", raw.as_bstr()),
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(BString::from(bstr::join("/", parts)))
}

/// A name or path of the image as the OS takes it: on Linux, the same bytes.
pub fn as_path(name: &[u8]) -> &std::path::Path {
    use std::os::unix::ffi::OsStrExt;
    std::path::Path::new(std::ffi::OsStr::from_bytes(name))
}

/// Split a normalised path into its parent and last component.
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.rfind_byte(b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Normalise an entry's path and decode whiteouts: `.wh..wh..opq` marks its directory opaque,
/// `.wh.NAME` deletes NAME. Returns the path the entry acts on and what it is.
pub fn classify(raw_path: &[u8], kind: Kind) -> Result<(BString, Kind)> {
    let path = normalize(raw_path)?;
    let (dir, name) = split(&path);
    if name == b".wh..wh..opq" {
        return Ok((BString::from(dir), Kind::Opaque));
    }
    if let Some(target) = name.strip_prefix(b".wh.") {
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Error::malformed(
                "layer tar",
                format!("entry {:?}: whiteout names nothing", raw_path.as_bstr()),
            ));
        }
        let mut path = BString::from(dir);
        if !dir.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(target);
        return Ok((path, Kind::Whiteout));
    }
    Ok((path, kind))
}

/// Whether an image's xattr is kept. Linux has no empty xattr name; `trusted.overlay.*`
/// would change what overlayfs does with the tree (opacity, redirects) — images say that with
/// whiteouts, and umoci refuses them too.
pub fn keep_xattr(name: &str) -> bool {
    !name.is_empty() && !name.starts_with("trusted.overlay.")
}

/// Stream `tar` once and index it, reading it as Go's `archive/tar` does ([`tarstream`]).
/// `on_file` is called for each regular file with its entry, its position in the index, and
/// a reader of exactly its contents (holes of sparse files as zeros; unread data is skipped).
/// A stream that breaks `limits` fails, naming what it broke. What follows the archive's end
/// is read too (and must decompress), so every command gives a damaged stream one verdict.
pub fn build(
    tar: impl Read,
    limits: Limits,
    mut on_file: impl FnMut(&Entry, usize, &mut dyn Read) -> Result<()>,
) -> Result<LayerIndex> {
    let bad = |reason: String| Error::malformed("layer tar", reason);
    let mut reader = tarstream::TarReader::new(tar, limits);
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        let header = reader.next_entry().map_err(|e| {
            let n = entries.len();
            let last = entries.last().map(|e| e.path.as_bstr()).unwrap_or_default();
            bad(if e.kind() == std::io::ErrorKind::UnexpectedEof && n > 0 {
                format!("the stream ends inside entry {last:?} (truncated)")
            } else if n > 0 {
                format!("after entry {last:?} ({n} entries): {e}")
            } else {
                e.to_string()
            })
        })?;
        let Some(header) = header else { break };
        let Some(entry) = decode(header)? else {
            continue;
        };
        if entry.kind == Kind::File {
            let mut data = reader.data();
            on_file(&entry, entries.len(), &mut data)?;
        }
        entries.push(entry);
    }
    reader.finish().map_err(|e| bad(e.to_string()))?;
    Ok(LayerIndex {
        entries,
        seek: None,
    })
}

/// Decode one tar entry; `None` for entries that carry no file (PAX globals and the like).
fn decode(h: tarstream::Header) -> Result<Option<Entry>> {
    let raw_path = h.name.as_bstr();
    let bad =
        |reason: String| Error::malformed("layer tar", format!("entry {raw_path:?}: {reason}"));
    let Some(kind) = entry_kind(h.typeflag).map_err(bad)? else {
        return Ok(None);
    };
    let (path, kind) = classify(&h.name, kind)?;
    if path.is_empty() && !matches!(kind, Kind::Dir | Kind::Opaque) {
        return Err(bad(format!(
            "names the image root, which must be a directory, as a {kind:?}"
        )));
    }
    let (uid, gid) = (
        linux_id(h.uid, "uid").map_err(bad)?,
        linux_id(h.gid, "gid").map_err(bad)?,
    );
    // Only permission bits matter; some writers put type bits in the mode field.
    let mode = (h.mode as u64 & 0o7777) as u32;
    let dev = |v: i64| u32::try_from(v).unwrap_or(0);
    let link = link_target(kind, h.link).map_err(bad)?;
    let xattrs = kept_xattrs(raw_path, h.xattrs);
    let size = if kind == Kind::File {
        h.size.max(0) as u64
    } else {
        0
    };
    Ok(Some(Entry {
        path,
        kind,
        mode,
        uid,
        gid,
        size,
        mtime: h.mtime,
        link,
        dev_major: dev(h.dev_major),
        dev_minor: dev(h.dev_minor),
        xattrs,
        offset: h.data_offset,
        sparse: match h.sparse {
            // A file that is all hole keeps one empty region at its end, so that it stays
            // apart from a dense file.
            Some(r) if r.is_empty() => vec![Region {
                offset: size,
                len: 0,
            }],
            Some(r) if kind == Kind::File => r,
            _ => Vec::new(),
        },
    }))
}

/// The kind a tar type flag makes; `None` for a PAX global header, which is no file.
fn entry_kind(typeflag: u8) -> std::result::Result<Option<Kind>, String> {
    Ok(Some(match typeflag {
        b'5' => Kind::Dir,
        b'0' | b'7' => Kind::File,
        b'2' => Kind::Symlink,
        b'1' => Kind::Hardlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'6' => Kind::Fifo,
        b'g' => return Ok(None),
        other => return Err(format!("unsupported entry type {:?}", other as char)),
    }))
}

/// A uid or gid as Linux holds it. Linux ids are 32 bits, and (uid_t)-1 means "leave
/// unchanged" to chown: an id Linux cannot hold is refused rather than truncated (Go's
/// chown would make 2^32 root).
fn linux_id(v: i64, what: &str) -> std::result::Result<u32, String> {
    u32::try_from(v)
        .ok()
        .filter(|v| *v != u32::MAX)
        .ok_or_else(|| format!("{what} {v} is not a Linux id"))
}

/// A link's target: a symlink's as written, a hardlink's normalised (it names a path in the
/// image, and must not climb out of it); `None` for other kinds.
fn link_target(kind: Kind, link: Vec<u8>) -> std::result::Result<Option<BString>, String> {
    match kind {
        Kind::Symlink => {
            if link.is_empty() {
                return Err("symlink without a target".into());
            }
            Ok(Some(BString::from(link)))
        }
        Kind::Hardlink => {
            if link.is_empty() {
                return Err("hardlink without a target".into());
            }
            normalize(&link).map(Some).map_err(|_| {
                format!(
                    "hardlink target {:?} climbs out of the image root",
                    link.as_bstr()
                )
            })
        }
        _ => Ok(None),
    }
}

/// The xattrs an entry keeps (see [`keep_xattr`]); the others are dropped with a debug line
/// naming the entry.
fn kept_xattrs(raw_path: &BStr, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let mut kept = Vec::new();
    for (name, value) in xattrs {
        // Linux has no empty or non-UTF-8 xattr names in any namespace it accepts.
        match String::from_utf8(name) {
            Ok(name) if keep_xattr(&name) => kept.push((name, value)),
            Ok(name) => tracing::debug!("entry {raw_path:?}: xattr {name:?} dropped"),
            Err(_) => {
                tracing::debug!("entry {raw_path:?}: an xattr whose name is not UTF-8 dropped")
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_and_never_climb_out() {
        assert_eq!(normalize(b"./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize(b"/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(normalize(b"a/../b").unwrap(), "b");
        assert_eq!(normalize(b"./").unwrap(), "");
        let e = normalize(b"a/../../etc").unwrap_err().to_string();
        assert!(e.contains("a/../../etc") && e.contains("climbs out"), "{e}");
    }

    #[test]
    fn whiteouts_are_decoded() {
        let mut b = tar::Builder::new(Vec::new());
        for (p, t) in [
            ("./dir/", tar::EntryType::Directory),
            ("./dir/.wh..wh..opq", tar::EntryType::Regular),
            ("./dir/.wh.gone", tar::EntryType::Regular),
            ("./dir/file", tar::EntryType::Regular),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(t);
            h.set_size(if p.ends_with("file") { 3 } else { 0 });
            h.set_mode(0o4755);
            let data: &[u8] = if p.ends_with("file") { b"abc" } else { b"" };
            b.append_data(&mut h, p, data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut seen = Vec::new();
        let idx = build(&tar[..], Limits::default(), |e, i, r| {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            seen.push((e.path.to_string(), i, s));
            Ok(())
        })
        .unwrap();
        let kinds: Vec<(&str, Kind)> = idx
            .entries
            .iter()
            .map(|e| (e.path.to_str().unwrap(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("dir", Kind::Dir),
                ("dir", Kind::Opaque),
                ("dir/gone", Kind::Whiteout),
                ("dir/file", Kind::File)
            ]
        );
        assert_eq!(seen, vec![("dir/file".to_string(), 3, "abc".to_string())]);
        assert_eq!(idx.entries[3].mode, 0o4755);
        assert_eq!(
            &tar[idx.entries[3].offset as usize..][..3],
            b"abc",
            "offset points at the data"
        );
    }
}
