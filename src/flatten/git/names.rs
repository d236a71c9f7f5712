//! Paths as git takes them: quoted for fast-import so that every byte survives, and the
//! names git refuses to check out (`.git` and its NTFS aliases) found before a commit
//! records one.

use std::io::Write;

/// Write a path as fast-import reads it: always C-style quoted, so that no byte of a name (a
/// newline, a leading quote, a byte that is not UTF-8) can end the command or change its
/// meaning. Bytes outside printable ASCII go as octal escapes, which fast-import turns back
/// into the same bytes.
pub(super) fn quote(path: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in path {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b' '..=b'~' => out.push(b),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push(b'"');
}

/// Whether `seg` is a name NTFS would open as `base` (git's `is_ntfs_dotgit` rule): `base` or
/// `short` in any case, followed only by dots and spaces, or by a `:stream` suffix.
fn ntfs_alias(seg: &[u8], base: &[u8], short: &[&[u8]]) -> bool {
    let rest = [base].iter().chain(short).find_map(|p| {
        (seg.len() >= p.len() && seg[..p.len()].eq_ignore_ascii_case(p)).then(|| &seg[p.len()..])
    });
    let Some(rest) = rest else {
        return false;
    };
    let end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    rest[..end].iter().all(|&b| b == b'.' || b == b' ')
}

/// Whether git refuses `name` as a component of a path it checks out or reads into its index
/// (git's `verify_path`, with `core.protectNTFS` on as it is by default): `.git` in any case
/// and the names NTFS reads as it — also after a backslash, a separator on NTFS — and, for a
/// symlink, `.gitmodules` likewise. fast-import records such paths without a word, so they
/// are refused before a commit holds one. A NUL byte cannot be in a git path at all.
pub(super) fn git_refuses(name: &[u8], symlink: bool) -> bool {
    name.contains(&0)
        || name.split(|&b| b == b'\\').any(|seg| {
            ntfs_alias(seg, b".git", &[b"git~1"])
                || (symlink
                    && ntfs_alias(
                        seg,
                        b".gitmodules",
                        &[b"gitmod~1", b"gitmod~2", b"gitmod~3", b"gitmod~4"],
                    ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bstr::BString;

    #[test]
    fn paths_are_quoted_so_that_every_byte_survives() {
        let mut out = Vec::new();
        quote(b"a b\n\"c\\d\xff\x7f\te", &mut out);
        assert_eq!(out, b"\"a b\\012\\\"c\\\\d\\377\\177\\011e\"");
    }

    #[test]
    fn names_git_would_not_record_are_known() {
        for bad in [
            &b".git"[..],
            b".GIT",
            b".Git. .",
            b"git~1",
            b".git:stream",
            b"a\\.git",
            b"x\0y",
        ] {
            assert!(git_refuses(bad, false), "{:?}", BString::from(bad));
        }
        assert!(git_refuses(b".gitmodules", true));
        assert!(git_refuses(b".GitModules ", true));
        for good in [
            &b".gitignore"[..],
            b".gitx",
            b"git",
            b"git~2",
            b"a.git",
            b"a\\b",
            b"\xff\n\"",
        ] {
            assert!(!git_refuses(good, false), "{:?}", BString::from(good));
        }
        assert!(!git_refuses(b".gitmodules", false));
    }
}
