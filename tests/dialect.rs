//! Layers in the tar dialects real writers produce, read as Go's `archive/tar` (Docker,
//! containerd, podman, umoci) reads them, with one answer from `cat`, `ls`, a mount, `pull`
//! and `pull --tar` for each: sparse files from GNU tar in every sparse format, names that are
//! not UTF-8, header quirks (docs/tar-dialect.md), and links that `cat`'s single-path merge
//! must see.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::layers::Tar;
use common::mounted::Mounted;
use common::*;

fn image_of(repo: &str, layers: Vec<Vec<u8>>) -> String {
    let reg = registry();
    FixtureImage::new(
        "amd64",
        layers.into_iter().map(FixtureLayer::from_tar).collect(),
    )
    .push(&reg.host, repo, "v1");
    format!("{}/{repo}:v1", reg.host)
}

/// `imgfs` with arguments that may not be UTF-8.
fn imgfs_os(cache: &Path, args: &[&OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imgfs"))
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("DOCKER_CONFIG", cache.join("no-docker-config"))
        .output()
        .unwrap()
}

fn cat(cache: &Path, image: &str, path: &[u8]) -> Vec<u8> {
    let out = imgfs_os(
        cache,
        &[
            OsStr::new("cat"),
            OsStr::new(image),
            OsStr::from_bytes(path),
        ],
    );
    assert!(
        out.status.success(),
        "cat {:?}: {}",
        String::from_utf8_lossy(path),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A 3 MiB file with data at its start, in its middle and at its end, holes between.
fn sparse_contents() -> Vec<u8> {
    let mut v = vec![0u8; 3 << 20];
    v[..5000].copy_from_slice(&text(5000, 1));
    v[(1 << 20) + 4096..(1 << 20) + 4096 + 70_000].copy_from_slice(&noise(70_000, 2));
    let n = v.len();
    v[n - 100..].copy_from_slice(&text(100, 3));
    v
}

/// A tar made by GNU tar of a sparse file `sparse` and a file `after` behind it.
fn gnu_tar_sparse(work: &Path, format: &[&str]) -> Vec<u8> {
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let contents = sparse_contents();
    // Written as holes: seek past the zeros.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(src.join("sparse")).unwrap();
        let mut at = 0usize;
        while at < contents.len() {
            let end = (at + 4096).min(contents.len());
            if contents[at..end].iter().all(|&b| b == 0) {
                f.seek(SeekFrom::Current((end - at) as i64)).unwrap();
            } else {
                f.write_all(&contents[at..end]).unwrap();
            }
            at = end;
        }
        f.set_len(contents.len() as u64).unwrap();
    }
    std::fs::write(src.join("after"), b"the file after the sparse one\n").unwrap();
    let out = work.join("layer.tar");
    let status = Command::new("tar")
        .args(["--sparse", "--mtime=@1600000000", "--owner=0", "--group=0"])
        .args(["--numeric-owner", "--sort=name", "-C"])
        .arg(&src)
        .args(format)
        .arg("-cf")
        .arg(&out)
        .args(["sparse", "after"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

#[test]
fn sparse_files_from_gnu_tar_read_the_same_everywhere() {
    let want = sparse_contents();
    for (name, format) in [
        ("gnu", &["--format=gnu"][..]),
        ("pax00", &["--format=pax", "--sparse-version=0.0"]),
        ("pax01", &["--format=pax", "--sparse-version=0.1"]),
        ("pax10", &["--format=pax", "--sparse-version=1.0"]),
    ] {
        let work = tempfile::tempdir().unwrap();
        let tar = gnu_tar_sparse(work.path(), format);
        let image = image_of(&format!("dialect/sparse-{name}"), vec![tar]);
        let cache = work.path().join("cache");
        let got = cat(&cache, &image, b"sparse");
        assert!(got == want, "{name}: cat of the sparse file differs");
        assert_eq!(
            cat(&cache, &image, b"after"),
            b"the file after the sparse one\n",
            "{name}"
        );
        let listing = imgfs_ok(&cache, &["ls", &image]);
        assert_eq!(
            listing, "after\nsparse\n",
            "{name}: no GNUSparseFile directory"
        );

        let target = work.path().join("rootfs");
        imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
        let pulled = std::fs::read(target.join("sparse")).unwrap();
        assert!(pulled == want, "{name}: pulled sparse file differs");
        // Holes stay holes on disk.
        let blocks = rustix::fs::stat(target.join("sparse")).unwrap().st_blocks;
        assert!(blocks * 512 < 1 << 20, "{name}: {blocks} blocks");

        let tar_out = work.path().join("out.tar");
        imgfs_ok(
            &cache,
            &["pull", "-q", "--tar", tar_out.to_str().unwrap(), &image],
        );
        let mut ar = tar::Archive::new(std::fs::File::open(&tar_out).unwrap());
        let mut seen = false;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap() == Path::new("sparse") {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                assert!(data == want, "{name}: --tar's sparse file differs");
                seen = true;
            }
        }
        assert!(seen, "{name}: --tar has the sparse file");

        let mnt = work.path().join("mnt");
        let m = Mounted::new(&cache.join("m"), &image, &mnt, &[]);
        let mounted = std::fs::read(mnt.join("sparse")).unwrap();
        let after = std::fs::read(mnt.join("after")).unwrap();
        m.unmount(&cache.join("m"));
        assert!(mounted == want, "{name}: mounted sparse file differs");
        assert_eq!(after, b"the file after the sparse one\n");
    }
}

#[test]
fn names_that_are_not_utf8_stay_apart_and_intact() {
    let names: [&[u8]; 4] = [b"\xff", b"\xfe", "\u{fffd}".as_bytes(), b"caf\xe9"];
    let mut b = tar::Builder::new(Vec::new());
    for (i, n) in names.iter().enumerate() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(2);
        b.append_data(&mut h, OsStr::from_bytes(n), format!("{i}\n").as_bytes())
            .unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    b.append_link(&mut h, "link", OsStr::from_bytes(b"caf\xe9"))
        .unwrap();
    let image = image_of("dialect/names", vec![b.into_inner().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    for (i, n) in names.iter().enumerate() {
        assert_eq!(cat(&cache, &image, n), format!("{i}\n").as_bytes());
    }
    assert_eq!(
        cat(&cache, &image, b"link"),
        b"3\n",
        "the link's target kept"
    );
    // Printed escaped (as `ls -b`), each name its own line.
    let listing = imgfs_ok(&cache, &["ls", &image]);
    assert_eq!(listing, "caf\\351\nlink\n\u{fffd}\n\\376\n\\377\n");

    let target = work.path().join("rootfs");
    imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    for root in [&target, &mnt] {
        for (i, n) in names.iter().enumerate() {
            let p = root.join(OsStr::from_bytes(n));
            assert_eq!(std::fs::read(&p).unwrap(), format!("{i}\n").as_bytes());
        }
        let link = std::fs::read_link(root.join("link")).unwrap();
        assert_eq!(link.as_os_str().as_bytes(), b"caf\xe9");
        let mut listed: Vec<Vec<u8>> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        listed.sort();
        assert_eq!(listed.len(), 5, "{}", root.display());
    }
    m.unmount(&cache);
}

/// A ustar header with a valid checksum, for the quirks the tar crate cannot write.
fn raw_header(name: &str, kind: u8, size: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..107].copy_from_slice(b"0000755");
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"13720577400");
    b[156] = kind;
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    b
}

fn raw_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut v = raw_header(name, b'0', data.len() as u64);
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

fn raw_pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut body = String::new();
    for (k, v) in records {
        let rest = k.len() + v.len() + 3;
        let mut n = rest + 1;
        while format!("{n}").len() + rest != n {
            n += 1;
        }
        body.push_str(&format!("{n} {k}={v}\n"));
    }
    let mut v = raw_header("PaxHeader", b'x', body.len() as u64);
    v.extend_from_slice(body.as_bytes());
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

#[test]
fn header_quirks_read_as_go_reads_them() {
    // A directory header claiming data (Go reads the next header right after it), then
    // repeated PAX paths (the last wins).
    let mut t = raw_header("dir/", b'5', 1024);
    t.extend(raw_file("dir/inside", b"seen\n"));
    t.extend(raw_pax(&[("path", "first"), ("path", "last")]));
    t.extend(raw_file("ustar-name", b"pax\n"));
    t.extend([0u8; 1024]);
    let image = image_of("dialect/quirks", vec![t]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    assert_eq!(
        imgfs_ok(&cache, &["ls", "-R", &image]),
        "/:\ndir\nlast\n\n/dir:\ninside\n"
    );
    assert_eq!(cat(&cache, &image, b"dir/inside"), b"seen\n");
    let target = work.path().join("rootfs");
    imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
    assert_eq!(std::fs::read(target.join("dir/inside")).unwrap(), b"seen\n");
    assert_eq!(std::fs::read(target.join("last")).unwrap(), b"pax\n");
}

#[test]
fn quirks_go_refuses_are_refused_by_every_command() {
    let zero_then_more = {
        let mut t = raw_file("a", b"1");
        t.extend([0u8; 512]);
        t.extend(raw_file("b", b"2"));
        t
    };
    let bad_size = {
        let mut t = raw_pax(&[("size", "-5")]);
        t.extend(raw_file("f", b"x"));
        t
    };
    let bad_mtime = {
        let mut t = raw_pax(&[("mtime", "1e20")]);
        t.extend(raw_file("f", b"x"));
        t
    };
    let root_file = raw_file("./", b"x");
    let huge_uid = {
        let mut t = raw_pax(&[("uid", "4294967296")]);
        t.extend(raw_file("f", b"x"));
        t
    };
    for (name, tar, want) in [
        ("zero", zero_then_more, "single zero block"),
        ("size", bad_size, "negative size"),
        ("mtime", bad_mtime, "not a time"),
        ("root", root_file, "image root"),
        ("uid", huge_uid, "not a Linux id"),
    ] {
        let image = image_of(&format!("dialect/refused-{name}"), vec![tar]);
        let work = tempfile::tempdir().unwrap();
        let target = work.path().join("rootfs");
        let pull = imgfs_err(
            &work.path().join("c1"),
            &["pull", "-q", &image, target.to_str().unwrap()],
        );
        assert!(pull.contains(want), "{name}: pull says {pull}");
        assert!(!target.exists());
        let ls = imgfs_err(&work.path().join("c2"), &["ls", "-R", &image]);
        assert!(ls.contains(want), "{name}: ls says {ls}");
    }
}

#[test]
fn cat_sees_a_hard_link_to_a_symlink_as_a_link() {
    // c/secret is deleted, and c/f written, through h: a hard link to the symlink s -> c.
    let image = image_of(
        "dialect/cat-links",
        vec![
            Tar::new()
                .dir("c", 0o755)
                .file("c/secret", 0o644, b"secret\n")
                .symlink("s", "c")
                .bytes(),
            Tar::new().hardlink("h", "s").bytes(),
            Tar::new()
                .whiteout("h/secret")
                .file("h/f", 0o644, b"through h\n")
                .bytes(),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let listing = imgfs_ok(&cache, &["ls", &image, "c"]);
    assert_eq!(listing, "f\n", "ls");
    let err = imgfs_err(&cache, &["cat", &image, "c/secret"]);
    assert!(err.contains("no such file"), "{err}");
    assert_eq!(cat(&cache, &image, b"c/f"), b"through h\n");
}

/// `pull` and `ls -R` of a one-layer image with this blob: both fail; their messages.
fn pull_and_ls_refuse(repo: &str, layer: FixtureLayer) -> (String, String) {
    let reg = registry();
    FixtureImage::new("amd64", vec![layer]).push(&reg.host, repo, "v1");
    let image = format!("{}/{repo}:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("rootfs");
    let pull = imgfs_err(
        &work.path().join("c1"),
        &["pull", "-q", &image, target.to_str().unwrap()],
    );
    assert!(!target.exists());
    let ls = imgfs_err(&work.path().join("c2"), &["ls", "-R", &image]);
    (pull, ls)
}

#[test]
fn every_command_gives_a_damaged_stream_one_verdict() {
    let tar = tar_of(&[("f", b"data")]);
    let mut garbage = gzip(&tar);
    garbage.extend_from_slice(b"not another gzip member");
    let layer = |blob: Vec<u8>, media_type| FixtureLayer {
        diff_id: imgfs::digest::Digest::of(&tar),
        annotations: Default::default(),
        blob,
        media_type,
    };
    use imgfs::manifest::media;
    for (repo, blob, mt, want) in [
        ("dialect/garbage", garbage, media::OCI_LAYER_GZIP, "gzip"),
        (
            "dialect/empty-zstd",
            Vec::new(),
            media::OCI_LAYER_ZSTD,
            "blob is empty",
        ),
        (
            "dialect/empty-gzip",
            Vec::new(),
            media::OCI_LAYER_GZIP,
            "blob is empty",
        ),
        (
            "dialect/gzip-as-tar",
            gzip(&tar),
            media::OCI_LAYER_TAR,
            "gzip-compressed, not a tar",
        ),
    ] {
        let (pull, ls) = pull_and_ls_refuse(repo, layer(blob, mt));
        assert!(pull.contains(want), "{repo}: pull says {pull}");
        assert!(ls.contains(want), "{repo}: ls says {ls}");
    }
}

#[test]
fn odd_metadata_is_served_as_written_or_dropped_where_linux_cannot_hold_it() {
    // Xattrs with an empty name (no such thing on Linux) and in trusted.overlay (they would
    // change what overlayfs does with the tree) are dropped; a time before 1970 is kept.
    let mut t = raw_pax(&[
        ("SCHILY.xattr.", "empty name"),
        ("SCHILY.xattr.user.ok", "1"),
        ("SCHILY.xattr.trusted.overlay.opaque", "y"),
        ("mtime", "-5"),
    ]);
    t.extend(raw_file("x", b"x\n"));
    t.extend([0u8; 1024]);
    let image = image_of("dialect/metadata", vec![t]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let names = |p: &Path| {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::listxattr(p, &mut buf).unwrap();
        let mut v: Vec<String> = buf[..n]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !n.starts_with("security."))
            .collect();
        v.sort();
        v
    };
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    let on_mount = (
        names(&mnt.join("x")),
        rustix::fs::stat(mnt.join("x")).unwrap().st_mtime,
    );
    m.unmount(&cache);
    assert_eq!(on_mount, (vec!["user.ok".to_string()], -5));

    let target = work.path().join("rootfs");
    imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
    assert_eq!(names(&target.join("x")), vec!["user.ok".to_string()]);
    assert_eq!(rustix::fs::stat(target.join("x")).unwrap().st_mtime, -5);

    let out = work.path().join("out.tar");
    imgfs_ok(
        &cache,
        &["pull", "-q", "--tar", out.to_str().unwrap(), &image],
    );
    let listing = Command::new("tar")
        .args(["--full-time", "--utc", "-tvf"])
        .arg(&out)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("1969-12-31 23:59:55 x"), "{listing}");
}

#[test]
fn thousands_of_refused_xattrs_make_one_warning() {
    let names: Vec<String> = (0..3000)
        .map(|i| format!("SCHILY.xattr.user.attr{i:04}"))
        .collect();
    let records: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "some value")).collect();
    let mut t = raw_pax(&records);
    t.extend(raw_file("many", b"x\n"));
    t.extend([0u8; 1024]);
    let image = image_of("dialect/xattrs", vec![t]);
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("rootfs");
    let out = imgfs(
        &work.path().join("cache"),
        &["pull", "-q", &image, target.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The filesystem holds a few of them (ext4: one block); the rest are refused, once.
    let warned = err.lines().filter(|l| l.contains("xattr")).count();
    assert!((1..=2).contains(&warned), "{warned} warning lines: {err}");
}
