//! The table of contents of one layer: every tar entry with its metadata and where its data
//! starts in the uncompressed stream, built by streaming the layer once. Whiteouts are
//! recognised here, so that `tree` deals in overlay operations rather than file names.
//!
//! Paths are normalised on the way in (`./x`, `/x` and `x` are one path; `.` and `//` vanish;
//! `..` that would climb out of the image root is refused), so no later stage sees them raw.

pub mod codec;
pub mod guard;

pub use guard::Limits;

use std::io::Read;

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

/// One tar entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalised: relative, `/`-separated, no `.`/`..`/empty components; `""` is the root.
    pub path: String,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Symlink target as written, or the normalised path a hardlink points at.
    pub link: Option<String>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Where the entry's data starts in the uncompressed tar stream.
    pub offset: u64,
}

/// All entries of a layer, in tar order, and (for gzip layers indexed for mounting) the seek
/// points that let any byte range of the uncompressed tar be produced cheaply.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    pub entries: Vec<Entry>,
    /// Gzip seek points and span digests; `None` when not recorded.
    pub seek: Option<crate::layer::seek::SeekPoints>,
}

/// Normalise a tar path. `what` names the entry in errors.
pub fn normalize(raw: &str) -> Result<String> {
    // Linux's PATH_MAX; longer names can only be hostile, and depth costs the tree work.
    if raw.len() > 4096 {
        return Err(Error::malformed(
            "layer",
            format!("entry name of {} bytes (longer than 4096)", raw.len()),
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in raw.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(Error::malformed(
                        "layer",
                        format!("entry {raw:?} climbs out of the image root"),
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Normalise an entry's path and decode whiteouts: `.wh..wh..opq` marks its directory opaque,
/// `.wh.NAME` deletes NAME. Returns the path the entry acts on and what it is.
pub fn classify(raw_path: &str, kind: Kind) -> Result<(String, Kind)> {
    let path = normalize(raw_path)?;
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path.as_str()),
    };
    if name == ".wh..wh..opq" {
        return Ok((dir.to_string(), Kind::Opaque));
    }
    if let Some(target) = name.strip_prefix(".wh.") {
        if target.is_empty() || target == "." || target == ".." {
            return Err(Error::malformed(
                "layer tar",
                format!("entry {raw_path:?}: whiteout names nothing"),
            ));
        }
        let path = if dir.is_empty() {
            target.to_string()
        } else {
            format!("{dir}/{target}")
        };
        return Ok((path, Kind::Whiteout));
    }
    Ok((path, kind))
}

/// Stream `tar` once and index it. `on_file` is called for each regular file with its entry,
/// its position in the index, and a reader of exactly its data (unread data is skipped).
/// A stream that breaks `limits` (or the caps of [`guard`]) fails, naming what it broke.
pub fn build(
    tar: impl Read,
    limits: Limits,
    mut on_file: impl FnMut(&Entry, usize, &mut dyn Read) -> Result<()>,
) -> Result<LayerIndex> {
    let bad = |reason: String| Error::malformed("layer tar", reason);
    let mut archive = tar::Archive::new(guard::TarGuard::new(tar, limits));
    let mut entries = Vec::new();
    let mut last = String::new();
    for item in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut item = item.map_err(|e| {
            let n = entries.len();
            bad(if e.kind() == std::io::ErrorKind::UnexpectedEof && n > 0 {
                format!("the stream ends inside entry {last:?} (truncated)")
            } else if n > 0 {
                format!("after entry {last:?} ({n} entries): {e}")
            } else {
                e.to_string()
            })
        })?;
        let raw_path = String::from_utf8_lossy(&item.path_bytes()).into_owned();
        last.clone_from(&raw_path);
        let Some(entry) = decode(&mut item, &raw_path)? else {
            continue;
        };
        if entry.kind == Kind::File {
            on_file(&entry, entries.len(), &mut item)?;
        }
        entries.push(entry);
    }
    Ok(LayerIndex {
        entries,
        seek: None,
    })
}

/// Decode one tar entry; `None` for entries that carry no file (PAX globals and the like).
fn decode<R: Read>(item: &mut tar::Entry<'_, R>, raw_path: &str) -> Result<Option<Entry>> {
    let bad =
        |reason: String| Error::malformed("layer tar", format!("entry {raw_path:?}: {reason}"));
    let header = item.header();
    use tar::EntryType as T;
    let kind = match header.entry_type() {
        T::Directory => Kind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => Kind::File,
        T::Symlink => Kind::Symlink,
        T::Link => Kind::Hardlink,
        T::Char => Kind::Char,
        T::Block => Kind::Block,
        T::Fifo => Kind::Fifo,
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => return Ok(None),
        other => {
            return Err(bad(format!(
                "unsupported entry type {:?}",
                other.as_byte() as char
            )));
        }
    };
    let (path, kind) = classify(raw_path, kind)?;
    // An all-NUL numeric field (some writers leave uid/gid unset) reads as 0, as GNU tar has it.
    let raw = header.as_old();
    let blank = |f: &[u8]| f.iter().all(|b| *b == 0 || *b == b' ');
    let num = |r: std::io::Result<u64>, field: &[u8], what: &str| match r {
        Err(_) if blank(field) => Ok(0),
        r => r.map_err(|e| bad(format!("bad {what}: {e}"))),
    };
    let mut mode = num(header.mode().map(u64::from), &raw.mode, "mode")? as u32 & 0o7777;
    let mut uid = num(header.uid(), &raw.uid, "uid")?;
    let mut gid = num(header.gid(), &raw.gid, "gid")?;
    let mut mtime = num(header.mtime(), &raw.mtime, "mtime")? as i64;
    let dev_major = header.device_major().ok().flatten().unwrap_or(0);
    let dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
    let link = match kind {
        Kind::Symlink => Some(
            item.link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| bad("symlink without a target".into()))?,
        ),
        Kind::Hardlink => {
            let raw = item
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| bad("hardlink without a target".into()))?;
            Some(normalize(&raw).map_err(|_| {
                bad(format!(
                    "hardlink target {raw:?} climbs out of the image root"
                ))
            })?)
        }
        _ => None,
    };
    let mut xattrs = Vec::new();
    if let Some(exts) = item.pax_extensions().map_err(|e| bad(e.to_string()))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad(e.to_string()))?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let text = || std::str::from_utf8(value).ok().map(str::trim);
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_string(), value.to_vec()));
            } else if key == "uid" {
                uid = text().and_then(|t| t.parse().ok()).unwrap_or(uid);
            } else if key == "gid" {
                gid = text().and_then(|t| t.parse().ok()).unwrap_or(gid);
            } else if key == "mtime" {
                mtime = text()
                    .and_then(|t| t.split('.').next())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(mtime);
            }
        }
    }
    if kind == Kind::Dir || kind == Kind::Symlink {
        // Some writers put type bits in the mode field; only permissions matter.
        mode &= 0o7777;
    }
    let size = if kind == Kind::File { item.size() } else { 0 };
    let (uid, gid) = (
        u32::try_from(uid).map_err(|_| bad(format!("uid {uid} out of range")))?,
        u32::try_from(gid).map_err(|_| bad(format!("gid {gid} out of range")))?,
    );
    Ok(Some(Entry {
        path,
        kind,
        mode,
        uid,
        gid,
        size,
        mtime,
        link,
        dev_major,
        dev_minor,
        xattrs,
        offset: item.raw_file_position(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_and_never_climb_out() {
        assert_eq!(normalize("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize("/etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(normalize("a/../b").unwrap(), "b");
        assert_eq!(normalize("./").unwrap(), "");
        let e = normalize("a/../../etc").unwrap_err().to_string();
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
            seen.push((e.path.clone(), i, s));
            Ok(())
        })
        .unwrap();
        let kinds: Vec<(&str, Kind)> = idx
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
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
