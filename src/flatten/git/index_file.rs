//! Writing `.git/index` for the work tree from the blob ids fast-import gave and the stat
//! data of the files just written, so that `git status` starts clean without hashing the
//! work tree again.

use std::path::Path;

use bstr::BString;

use crate::error::{IoContext, Result};

/// Write git's index (`.git/index`, format version 2, gitformat-index(5)) for the work tree
/// at `root`, which holds `listing` (the last commit): each entry's object id from
/// fast-import, its stat data from the file just written. This is what `git reset` would
/// write, without hashing every file of the work tree again — a fifth of a plain pull's time
/// on a Debian-like image. The stat data makes `git status` trust the files as they are.
pub(super) fn write_index(
    root: &Path,
    listing: &[(&'static str, u32, BString)],
    ids: &[[u8; 20]],
) -> Result<()> {
    use sha1::Digest as _;
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<&(&'static str, u32, BString)> = listing.iter().collect();
    // git orders entries by their path's bytes.
    entries.sort_unstable_by(|a, b| a.2.cmp(&b.2));
    let mut out = Vec::with_capacity(12 + entries.len() * 100);
    out.extend_from_slice(b"DIRC");
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (mode, mark, path) in entries {
        let p = root.join(crate::index::as_path(path));
        let md = std::fs::symlink_metadata(&p).ctx(|| format!("reading {}", p.display()))?;
        let mode: u32 = match *mode {
            "100755" => 0o100755,
            "120000" => 0o120000,
            _ => 0o100644,
        };
        // git keeps the low 32 bits of each of these.
        for field in [
            md.ctime() as u32,
            md.ctime_nsec() as u32,
            md.mtime() as u32,
            md.mtime_nsec() as u32,
            md.dev() as u32,
            md.ino() as u32,
            mode,
            md.uid(),
            md.gid(),
            md.size() as u32,
        ] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(&ids[*mark as usize - 1]);
        // Stage 0; the name's length, or 0xfff for "longer".
        out.extend_from_slice(&(path.len().min(0xfff) as u16).to_be_bytes());
        out.extend_from_slice(path);
        // 1 to 8 NULs, so that the entry (62 bytes and the name) ends on a multiple of 8.
        let len = 62 + path.len();
        out.resize(out.len() + (len + 8) / 8 * 8 - len, 0);
    }
    let sum = sha1::Sha1::digest(&out);
    out.extend_from_slice(&sum);
    // As git does: written aside, renamed into place.
    let lock = root.join(".git/index.lock");
    std::fs::write(&lock, &out).ctx(|| format!("writing {}", lock.display()))?;
    std::fs::rename(&lock, root.join(".git/index")).ctx(|| "writing .git/index".into())
}
