//! `imgfs pull` conformance: fixture images covering the overlay rules and every entry kind are
//! pulled from a real registry and compared with `umoci unpack` of the same image; hostile
//! layers are refused with nothing written outside the target; `--tar` matches the directory.

mod common;

use std::path::Path;
use std::process::Command;

use common::compare::assert_same_tree;
use common::fixtures::rich_image;
use common::layers::Tar;
use common::*;

#[test]
fn pull_matches_umoci_on_every_overlay_rule_and_entry_kind() {
    let reg = registry();
    let img = rich_image();
    img.push(&reg.host, "conf/rich", "v1");
    let image = format!("{}/conf/rich:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");

    let ours = work.path().join("ours");
    imgfs_ok(&cache, &["pull", "--quiet", &image, ours.to_str().unwrap()]);
    let reference = umoci_unpack(&image, work.path());
    assert_same_tree(&ours, &reference, "imgfs pull vs umoci unpack");

    // Again from a warm cache: indexes are known up front, so shadowed files are skipped.
    let warm = work.path().join("warm");
    imgfs_ok(&cache, &["pull", "--quiet", &image, warm.to_str().unwrap()]);
    assert_same_tree(&warm, &reference, "warm pull vs umoci unpack");
    // A damaged cached index is noticed, discarded and rebuilt.
    let idx = cache
        .join("indexes/sha256")
        .join(img.layers[0].digest().hex());
    std::fs::write(&idx, b"IMGFSIDX garbage").unwrap();
    let again = work.path().join("again");
    imgfs_ok(
        &cache,
        &["pull", "--quiet", &image, again.to_str().unwrap()],
    );
    assert_same_tree(&again, &reference, "pull over a damaged index");
    assert!(
        std::fs::read(&idx).unwrap().len() > 100,
        "the index was rebuilt"
    );

    // Spot checks of what the comparison covers, so that a shared mistake cannot hide.
    let s = common::compare::snapshot(&ours);
    assert!(!s.records.contains_key("var/cache/stale"));
    assert!(!s.records.contains_key("opq/a") && s.records.contains_key("opq/new"));
    assert_eq!(s.records["usr/lib/libnew.so"].kind, "file");
    assert_eq!(s.records["tmp"].mode, 0o1777);
    assert_eq!(s.records["usr/bin/tool-link"].mode, 0o4755);
    assert_eq!(s.records["etc"].mode, 0o700);
    // t/target was replaced after t/link was linked to it: they no longer share an inode.
    assert!(
        !s.hardlinks
            .iter()
            .any(|g| g.contains(&"t/link".to_string()) && g.contains(&"t/target".to_string())),
        "{:?}",
        s.hardlinks
    );
    assert_eq!(
        std::fs::read(ours.join("t/link")).unwrap(),
        b"old target bytes"
    );
    assert_eq!(s.records["usr/bin/ping"].xattrs["user.origin"], b"fixture");
    assert_eq!(s.records["home/user/notes"].uid, 1000);

    // The same tree as one tar stream, extracted by GNU tar.
    let tar_file = work.path().join("out.tar");
    imgfs_ok(
        &cache,
        &[
            "pull",
            "--quiet",
            &image,
            "--tar",
            tar_file.to_str().unwrap(),
        ],
    );
    let extracted = work.path().join("from-tar");
    std::fs::create_dir(&extracted).unwrap();
    run_ok(
        Command::new("tar")
            .args([
                "-xpf",
                tar_file.to_str().unwrap(),
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "-C",
            ])
            .arg(&extracted),
    );
    assert_same_tree(
        &extracted,
        &ours,
        "--tar extracted by GNU tar vs pull to a directory",
    );
}

#[test]
fn a_whiteout_spares_what_its_own_layer_added_earlier() {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(
                Tar::new()
                    .dir("d", 0o755)
                    .file("d/x", 0o644, b"lower")
                    .bytes(),
            ),
            FixtureLayer::from_tar(
                Tar::new()
                    .file("d/x", 0o644, b"same layer")
                    .whiteout("d/x")
                    .bytes(),
            ),
        ],
    );
    img.push(&reg.host, "conf/samelayer", "v1");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("root");
    imgfs_ok(
        &work.path().join("cache"),
        &[
            "pull",
            "-q",
            &format!("{}/conf/samelayer:v1", reg.host),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(out.join("d/x")).unwrap(), b"same layer");
}

/// Pull a one-layer image built from `tar`; returns the error line and checks that nothing
/// was written: no target, no build directory left next to it, nothing outside.
fn pull_hostile(name: &str, layers: Vec<Vec<u8>>) -> String {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        layers.into_iter().map(FixtureLayer::from_tar).collect(),
    );
    img.push(&reg.host, &format!("hostile/{name}"), "v1");
    let work = tempfile::tempdir().unwrap();
    let parent = work.path().join("parent");
    std::fs::create_dir(&parent).unwrap();
    let target = parent.join("rootfs");
    let err = imgfs_err(
        &work.path().join("cache"),
        &[
            "pull",
            "-q",
            &format!("{}/hostile/{name}:v1", reg.host),
            target.to_str().unwrap(),
        ],
    );
    assert!(!target.exists(), "{name}: a failed pull leaves no target");
    let left: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
    assert!(
        left.is_empty(),
        "{name}: build directory left behind: {left:?}"
    );
    assert!(
        !work.path().join("escaped").exists(),
        "{name}: wrote outside the target"
    );
    err
}

#[test]
fn hostile_layers_are_refused_and_nothing_escapes() {
    let err = pull_hostile(
        "traversal",
        vec![
            Tar::new()
                .raw_entry("../../escaped", tar::EntryType::Regular, None, b"x")
                .bytes(),
        ],
    );
    assert!(
        err.contains("../../escaped") && err.contains("climbs out"),
        "{err}"
    );

    let err = pull_hostile(
        "hardlink-out",
        vec![
            Tar::new()
                .raw_entry("h", tar::EntryType::Link, Some("../../../etc/passwd"), b"")
                .bytes(),
        ],
    );
    assert!(err.contains("etc/passwd"), "{err}");

    let err = pull_hostile(
        "missing-link",
        vec![Tar::new().hardlink("h", "nowhere").bytes()],
    );
    assert!(
        err.contains("\"nowhere\"") && err.contains("does not exist"),
        "{err}"
    );

    let err = pull_hostile(
        "file-parent",
        vec![
            Tar::new()
                .dir("a", 0o755)
                .file("a/b", 0o644, b"")
                .file("a", 0o644, b"now a file")
                .file("a/c", 0o644, b"under a file")
                .bytes(),
        ],
    );
    assert!(
        err.contains("\"a/c\"") && err.contains("not a directory"),
        "{err}"
    );

    let err = pull_hostile(
        "symlink-loop",
        vec![
            Tar::new()
                .symlink("x", "y")
                .symlink("y", "x")
                .file("x/f", 0o644, b"")
                .bytes(),
        ],
    );
    assert!(
        err.contains("\"x/f\"") && err.contains("symbolic links"),
        "{err}"
    );

    let mut truncated = Tar::new().file("big", 0o644, &[7u8; 10_000]).bytes();
    truncated.truncate(3_000);
    let err = pull_hostile("truncated", vec![truncated]);
    assert!(err.contains("layer") && err.contains("big"), "{err}");
}

#[test]
fn symlinks_planted_by_earlier_layers_resolve_inside_the_target() {
    // An absolute symlink pointing "outside", then files written through it: they land inside
    // the image root, as umoci and Docker put them, never in the host's directory.
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("escaped");
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(
                Tar::new()
                    .symlink("abs", outside.to_str().unwrap())
                    .symlink("rel", "../../../../../../../../escaped")
                    .bytes(),
            ),
            FixtureLayer::from_tar(
                Tar::new()
                    .file("abs/owned", 0o644, b"x")
                    .file("rel/owned", 0o644, b"y")
                    .bytes(),
            ),
        ],
    );
    img.push(&reg.host, "hostile/planted", "v1");
    let image = format!("{}/hostile/planted:v1", reg.host);
    let target = work.path().join("rootfs");
    imgfs_ok(
        &work.path().join("cache"),
        &["pull", "-q", &image, target.to_str().unwrap()],
    );
    assert!(!outside.exists(), "nothing written outside the target");
    let inside = target
        .join(outside.strip_prefix("/").unwrap())
        .join("owned");
    assert_eq!(std::fs::read(inside).unwrap(), b"x");
    assert_eq!(std::fs::read(target.join("escaped/owned")).unwrap(), b"y");
    let reference = umoci_unpack(&image, &work.path().join("umoci"));
    assert_same_tree(&target, &reference, "symlinked parents vs umoci");
}

#[test]
fn the_target_must_be_new_or_empty() {
    let reg = registry();
    FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"x")])]).push(
        &reg.host,
        "conf/target",
        "v1",
    );
    let image = format!("{}/conf/target:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    let err = imgfs_err(
        &work.path().join("cache"),
        &["pull", &image, full.to_str().unwrap()],
    );
    assert!(err.contains("must be new or empty"), "{err}");
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");

    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    imgfs_ok(
        &work.path().join("cache"),
        &["pull", "-q", &image, empty.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(empty.join("f")).unwrap(), b"x");
}

#[test]
fn zstd_and_uncompressed_layers_flatten_like_their_gzip_twins() {
    let reg = registry();
    let tars = [
        Tar::new()
            .dir("a", 0o755)
            .file("a/one", 0o644, b"1")
            .symlink("link", "a/one")
            .bytes(),
        Tar::new()
            .whiteout("link")
            .file("a/two", 0o600, b"22")
            .bytes(),
    ];
    let gz = FixtureImage::new(
        "amd64",
        tars.iter().cloned().map(FixtureLayer::from_tar).collect(),
    );
    let zst = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::zstd_from_tar(tars[0].clone()),
            FixtureLayer::plain_tar(tars[1].clone()),
        ],
    );
    gz.push(&reg.host, "conf/twins", "gzip");
    zst.push(&reg.host, "conf/twins", "zstd");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (a, b) = (work.path().join("gz"), work.path().join("zst"));
    imgfs_ok(
        &cache,
        &[
            "pull",
            "-q",
            &format!("{}/conf/twins:gzip", reg.host),
            a.to_str().unwrap(),
        ],
    );
    imgfs_ok(
        &cache,
        &[
            "pull",
            "-q",
            &format!("{}/conf/twins:zstd", reg.host),
            b.to_str().unwrap(),
        ],
    );
    assert_same_tree(&b, &a, "zstd + plain vs gzip");
    assert!(!a.join("link").exists() && a.join("a/two").exists());
}

#[test]
fn git_mode_records_one_commit_per_layer() {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(
                Tar::new()
                    .dir("etc", 0o755)
                    .file("etc/a", 0o644, b"a1")
                    .file("etc/b", 0o644, b"b1")
                    .dir("run", 0o755)
                    .fifo("run/fifo", 0o600)
                    .bytes(),
            ),
            FixtureLayer::from_tar(Tar::new().file("etc/a", 0o644, b"a2").bytes()),
            FixtureLayer::from_tar(
                Tar::new()
                    .whiteout("etc/b")
                    .file("etc/c", 0o644, b"c3")
                    .bytes(),
            ),
        ],
    );
    img.push(&reg.host, "conf/git", "v1");
    let image = format!("{}/conf/git:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let repo = work.path().join("repo");
    imgfs_ok(
        &cache,
        &["pull", "-q", "--git", &image, repo.to_str().unwrap()],
    );

    let git = |args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let log = git(&["log", "--format=%s"]);
    let subjects: Vec<&str> = log.lines().collect();
    assert_eq!(subjects.len(), 3, "{log}");
    for (i, l) in img.layers.iter().rev().enumerate() {
        assert!(subjects[i].contains(l.digest().as_str()), "{log}");
    }
    assert_eq!(
        git(&["diff", "--name-status", "HEAD~1", "HEAD"]),
        "D\tetc/b\nA\tetc/c\n"
    );
    assert_eq!(
        git(&["diff", "--name-status", "HEAD~2", "HEAD~1"]),
        "M\tetc/a\n"
    );
    // A file a later layer deletes is in the commits before it and gone from the one after.
    assert_eq!(git(&["show", "HEAD~1:etc/b"]), "b1");
    assert_eq!(
        git(&["ls-tree", "--name-only", "HEAD~1", "etc/"]),
        "etc/a\netc/b\n"
    );
    assert_eq!(
        git(&["ls-tree", "--name-only", "HEAD", "etc/"]),
        "etc/a\netc/c\n"
    );
    let branches = git(&["branch", "--format=%(refname:short)"]);
    assert!(
        branches.contains(&format!("layer-2-{}", &img.layers[1].digest().hex()[..12])),
        "{branches}"
    );
    assert_eq!(
        git(&["status", "--porcelain"]),
        "",
        "the work tree is the last commit"
    );
    assert_eq!(
        git(&["diff-files", "--name-only"]),
        "",
        "stat data as on disk"
    );

    let plain = work.path().join("plain");
    imgfs_ok(&cache, &["pull", "-q", &image, plain.to_str().unwrap()]);
    std::fs::remove_dir_all(repo.join(".git")).unwrap();
    assert_same_tree(&repo, &plain, "--git work tree vs plain pull");
}

/// `git -C repo ARGS`, its stdout as bytes (names in it need not be UTF-8).
fn git_bytes(repo: &Path, args: &[&[u8]]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args.iter().map(|a| std::ffi::OsStr::from_bytes(a)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {:?}: {}",
        args.iter()
            .map(|a| String::from_utf8_lossy(a))
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `git ls-tree -r -z REV`: (mode, path) of every file in the commit.
fn git_files(repo: &Path, rev: &str) -> std::collections::BTreeSet<(String, Vec<u8>)> {
    git_bytes(repo, &[b"ls-tree", b"-r", b"-z", rev.as_bytes()])
        .split(|&b| b == 0)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let tab = l.iter().position(|&b| b == b'\t').unwrap();
            let mode = String::from_utf8(l[..6].to_vec()).unwrap();
            (mode, l[tab + 1..].to_vec())
        })
        .collect()
}

#[test]
fn git_mode_keeps_odd_names_kinds_and_deletions() {
    // Names fast-import must receive quoted, each byte intact: not UTF-8, a newline, quotes
    // (one leading), a backslash, a space, a tab.
    let odd: [&[u8]; 7] = [
        b"d/caf\xe9",
        b"d/new\nline",
        b"d/q\"uote",
        b"d/\"lead",
        b"d/back\\slash",
        b"d/sp ace",
        b"d/tab\tx",
    ];
    let mut first = Tar::new().dir("d", 0o755);
    for (i, n) in odd.iter().enumerate() {
        first = first.file_bytes(n, 0o644, format!("odd {i}").as_bytes());
    }
    let first = first
        .dir("bin", 0o755)
        .file("bin/run", 0o755, b"#!/bin/sh\n")
        .hardlink("bin/again", "bin/run")
        .symlink("ln", "d/sp ace")
        .fifo("fifo", 0o644)
        .dir("gone", 0o755)
        .dir("gone/sub", 0o755)
        .file("gone/sub/f", 0o644, b"f")
        .file("x", 0o644, b"file then dir")
        .bytes();
    let second = Tar::new()
        .whiteout("gone")
        .whiteout("d/new\nline")
        .whiteout("x")
        .dir("x", 0o700)
        .file("x/y", 0o644, b"y")
        .bytes();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(first),
            FixtureLayer::from_tar(second),
        ],
    );
    let reg = registry();
    img.push(&reg.host, "conf/git-odd", "v1");
    let image = format!("{}/conf/git-odd:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let repo = work.path().join("repo");
    imgfs_ok(
        &cache,
        &["pull", "-q", "--git", &image, repo.to_str().unwrap()],
    );

    let entry = |mode: &str, path: &[u8]| (mode.to_string(), path.to_vec());
    let mut want: std::collections::BTreeSet<_> = odd.iter().map(|n| entry("100644", n)).collect();
    want.extend([
        entry("100755", b"bin/run"),
        entry("100755", b"bin/again"),
        entry("120000", b"ln"),
        entry("100644", b"gone/sub/f"),
        entry("100644", b"x"),
    ]);
    assert_eq!(git_files(&repo, "HEAD~1"), want, "the first layer's commit");
    for (i, n) in odd.iter().enumerate() {
        let mut rev = b"HEAD~1:".to_vec();
        rev.extend_from_slice(n);
        assert_eq!(
            git_bytes(&repo, &[b"cat-file", b"blob", &rev]),
            format!("odd {i}").as_bytes()
        );
    }
    assert_eq!(
        git_bytes(&repo, &[b"cat-file", b"blob", b"HEAD~1:ln"]),
        b"d/sp ace"
    );
    want.remove(&entry("100644", b"gone/sub/f"));
    want.remove(&entry("100644", b"d/new\nline"));
    want.remove(&entry("100644", b"x"));
    want.insert(entry("100644", b"x/y"));
    assert_eq!(git_files(&repo, "HEAD"), want, "the second layer's commit");
    assert_eq!(
        git_bytes(&repo, &[b"status", b"--porcelain", b"-z"]),
        b"",
        "the work tree is the last commit"
    );
    // The index imgfs wrote: the last commit's tree, with stat data that matches every file,
    // so that git needs to read none of them again (diff-files does not refresh).
    assert_eq!(
        git_bytes(
            &repo,
            &[b"diff-index", b"--cached", b"--name-only", b"HEAD"]
        ),
        b""
    );
    assert_eq!(git_bytes(&repo, &[b"diff-files", b"--name-only"]), b"");

    let plain = work.path().join("plain");
    imgfs_ok(&cache, &["pull", "-q", &image, plain.to_str().unwrap()]);
    std::fs::remove_dir_all(repo.join(".git")).unwrap();
    assert_same_tree(&repo, &plain, "--git work tree vs plain pull");
}

#[test]
fn git_mode_refuses_a_git_directory_in_any_layer() {
    // In any case (git refuses `.GIT` too), and even when a later layer deletes it: the
    // commit of the layer that has it could not be checked out.
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(
                Tar::new()
                    .dir("src/.GIT", 0o755)
                    .file("src/.GIT/config", 0o644, b"[core]\n")
                    .bytes(),
            ),
            FixtureLayer::from_tar(Tar::new().whiteout("src/.GIT").bytes()),
        ],
    );
    let reg = registry();
    img.push(&reg.host, "conf/git-dotgit", "v1");
    let image = format!("{}/conf/git-dotgit:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let repo = work.path().join("repo");
    let err = imgfs_err(
        &cache,
        &["pull", "-q", "--git", &image, repo.to_str().unwrap()],
    );
    assert!(err.contains("src/.GIT"), "{err}");
    assert!(!repo.exists(), "nothing written");
    let left: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "cache")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_corrupted_layer_fails_the_pull_and_leaves_nothing() {
    // Its own registry: this test corrupts storage. Layers are extracted while they download,
    // so this checks that nothing extracted from unverified bytes survives.
    let reg = Registry::start(RegistryAuth::None);
    let layer = FixtureLayer::from_tar(Tar::new().file("f", 0o644, &[9u8; 50_000]).bytes());
    let digest = layer.digest();
    FixtureImage::new("amd64", vec![layer]).push(&reg.host, "hostile/corrupt", "v1");
    let data = reg.blob_data_path(&digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55; // in the gzip trailer: the tar still parses
    std::fs::write(&data, bytes).unwrap();

    let work = tempfile::tempdir().unwrap();
    let parent = work.path().join("parent");
    std::fs::create_dir(&parent).unwrap();
    let cache = work.path().join("cache");
    let err = imgfs_err(
        &cache,
        &[
            "pull",
            "-q",
            &format!("{}/hostile/corrupt:v1", reg.host),
            parent.join("root").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("digest mismatch") && err.contains(digest.as_str()),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&parent).unwrap().count(),
        0,
        "nothing left next to the target"
    );
    assert!(!cache.join("blobs/sha256").join(digest.hex()).exists());
    assert!(
        !cache.join("indexes/sha256").join(digest.hex()).exists(),
        "no index of unverified bytes"
    );
}

#[test]
fn without_root_modes_survive_and_tar_output_works() {
    // As `nobody`: owners cannot be set (said once), but setuid bits, unreadable files and
    // read-only directories must still come out right.
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![FixtureLayer::from_tar(
            Tar::new()
                .dir("usr", 0o555)
                .dir("usr/bin", 0o555)
                .file("usr/bin/su", 0o4755, b"setuid")
                .dir("etc", 0o755)
                .file("etc/shadow", 0o000, b"secret")
                .bytes(),
        )],
    );
    img.push(&reg.host, "conf/nonroot", "v1");
    let image = format!("{}/conf/nonroot:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_imgfs"))
            .arg("--cache-dir")
            .arg(work.path().join("cache"))
            .args(args)
            .env("HOME", work.path())
            .env("DOCKER_CONFIG", work.path().join("none"))
            .output()
            .unwrap()
    };
    let root = work.path().join("root");
    let out = as_nobody(&["pull", "-q", &image, root.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("not running as root").count(),
        1,
        "said once: {stderr}"
    );
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/su"), 0o4755);
    assert_eq!(mode("etc/shadow"), 0o000);
    assert_eq!(mode("usr/bin"), 0o555);

    let tar_file = work.path().join("out.tar");
    let out = as_nobody(&["pull", "-q", &image, "--tar", tar_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = Command::new("tar")
        .args(["-tvf", tar_file.to_str().unwrap()])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("-rwsr-xr-x") && listing.contains("usr/bin/su"),
        "{listing}"
    );
    assert!(
        listing.contains("----------") && listing.contains("etc/shadow"),
        "{listing}"
    );
}
