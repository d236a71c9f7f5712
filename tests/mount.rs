//! `imgfs mount`: the mounted tree equals what `imgfs pull` writes (same comparator as the pull
//! suite), reads stay correct under concurrency, the daemon unmounts cleanly on SIGTERM and
//! `imgfs umount`, a damaged cached index is rebuilt, and `ls`/`cat` answer without FUSE.

mod common;

use common::compare::{assert_same_tree, snapshot};
use common::fixtures::rich_image;
use common::layers::Tar;
use common::mounted::{Mounted, is_mounted};
use common::*;

#[test]
fn the_mounted_tree_equals_the_pulled_tree() {
    let reg = registry();
    let img = rich_image();
    img.push(&reg.host, "mount/rich", "v1");
    let image = format!("{}/mount/rich:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let pulled = work.path().join("pulled");
    imgfs_ok(&cache, &["pull", "-q", &image, pulled.to_str().unwrap()]);

    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), &[]);
    assert_same_tree(&m.dir, &pulled, "mount vs pull");
    let s = snapshot(&m.dir);
    assert_eq!(s.records["usr/bin/ping"].xattrs["user.origin"], b"fixture");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.contains(&image),
        "the image is the mount's source"
    );
    assert!(
        std::fs::write(m.dir.join("etc/new"), b"x").is_err(),
        "read-only"
    );

    m.unmount(&cache);

    // A pull after the mount leaves the mount's indexes (with seek points) as they are.
    let read_indexes = || {
        let mut v: Vec<(std::path::PathBuf, Vec<u8>)> =
            std::fs::read_dir(cache.join("indexes/sha256"))
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let b = std::fs::read(&p).unwrap();
                    (p, b)
                })
                .collect();
        v.sort();
        v
    };
    let before = read_indexes();
    imgfs_ok(
        &cache,
        &[
            "pull",
            "-q",
            &image,
            work.path().join("again").to_str().unwrap(),
        ],
    );
    assert_eq!(read_indexes(), before);
}

/// A gzip image with files spread over several seek-point spans; `big_noise` adds one
/// incompressible file of that many bytes, which seek points land inside.
fn big_image(repo: &str, big_noise: usize) -> (String, Vec<(String, Vec<u8>)>) {
    let reg = registry();
    let mut files = Vec::new();
    for i in 0..40 {
        let len = [10usize, 70_000, 1_500_000, 5_000][i % 4];
        // Half compressible, half noise.
        let data = if i % 2 == 0 {
            text(len, 5 + i as u64)
        } else {
            noise(len, 5 + i as u64)
        };
        files.push((format!("d{}/f{i}", i % 5), data));
    }
    if big_noise > 0 {
        files.insert(20, ("d0/big".to_string(), noise(big_noise, 3)));
    }
    let mut t = Tar::new();
    for d in 0..5 {
        t = t.dir(&format!("d{d}"), 0o755);
    }
    for (p, data) in &files {
        t = t.file(p, 0o644, data);
    }
    FixtureImage::new("amd64", vec![FixtureLayer::from_tar(t.bytes())]).push(&reg.host, repo, "v1");
    (format!("{}/{repo}:v1", reg.host), files)
}

#[test]
fn concurrent_readers_get_right_bytes_while_listing_goes_on() {
    concurrent_readers("mount/big", 0, &[]);
}

/// The same with the blob kept: reads come from the local blob, the big noise file's bytes
/// mostly straight out of its stored blocks.
#[test]
fn concurrent_readers_of_a_kept_blob_get_right_bytes() {
    concurrent_readers("mount/big-kept", 9_000_000, &["--keep-blobs"]);
}

fn concurrent_readers(repo: &str, big_noise: usize, args: &[&str]) {
    let (image, files) = big_image(repo, big_noise);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), args);
    let dir = m.dir.clone();
    std::thread::scope(|s| {
        for t in 0..6 {
            let files = &files;
            let dir = &dir;
            s.spawn(move || {
                for k in 0..25 {
                    let (p, want) = &files[(t * 7 + k * 3) % files.len()];
                    use std::io::{Read, Seek};
                    let mut f = std::fs::File::open(dir.join(p)).unwrap();
                    // A random window, then the whole file.
                    let off = (k * 7919) % want.len().max(1);
                    f.seek(std::io::SeekFrom::Start(off as u64)).unwrap();
                    let mut part = vec![0u8; 4096.min(want.len() - off)];
                    f.read_exact(&mut part).unwrap();
                    assert_eq!(&part[..], &want[off..off + part.len()], "{p} at {off}");
                    assert_eq!(&std::fs::read(dir.join(p)).unwrap(), want, "{p}");
                }
            });
        }
        s.spawn(|| {
            for _ in 0..50 {
                for d in 0..5 {
                    assert_eq!(
                        std::fs::read_dir(dir.join(format!("d{d}")))
                            .unwrap()
                            .count(),
                        files
                            .iter()
                            .filter(|(p, _)| p.starts_with(&format!("d{d}/")))
                            .count()
                    );
                }
            }
        });
    });
    // SIGTERM unmounts and the daemon exits.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(m.pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    m.wait_gone();
}

#[test]
fn ls_and_cat_answer_without_mounting() {
    let (image, files) = big_image("mount/ls", 0);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let out = imgfs_ok(&cache, &["ls", &image, "/d1"]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["f1", "f11", "f16", "f21", "f26", "f31", "f36", "f6"]
    );
    let long = imgfs_ok(&cache, &["ls", "-l", &image, "d1/f1"]);
    assert!(
        long.starts_with("-rw-r--r--") && long.contains(" 70000 "),
        "{long}"
    );
    let (p, want) = &files[2];
    let got = imgfs(&cache, &["cat", &image, p]);
    assert!(got.status.success());
    assert_eq!(&got.stdout, want);
    let err = imgfs_err(&cache, &["cat", &image, "/nope"]);
    assert!(
        err.contains("/nope") && err.contains("no such file"),
        "{err}"
    );

    // A damaged cached index is discarded and rebuilt.
    let idx_dir = cache.join("indexes/sha256");
    let idx = std::fs::read_dir(&idx_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&idx, &bytes).unwrap();
    let again = imgfs(&cache, &["cat", &image, p]);
    assert!(again.status.success());
    assert_eq!(&again.stdout, want);
    assert!(String::from_utf8_lossy(&again.stderr).contains("discarding cached index"));
    assert_ne!(std::fs::read(&idx).unwrap(), bytes, "rebuilt");
}

#[test]
fn mount_refuses_bad_targets_clearly() {
    let reg = registry();
    FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"x")])]).push(
        &reg.host,
        "mount/small",
        "v1",
    );
    let image = format!("{}/mount/small:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let err = imgfs_err(
        &cache,
        &[
            "mount",
            &image,
            work.path().join("missing").to_str().unwrap(),
        ],
    );
    assert!(err.contains("no such directory"), "{err}");
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"").unwrap();
    let err = imgfs_err(&cache, &["mount", &image, full.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), &["--layer", "1"]);
    assert_eq!(std::fs::read(m.dir.join("f")).unwrap(), b"x");
    let err = imgfs_err(&cache, &["mount", &image, m.dir.to_str().unwrap()]);
    assert!(err.contains("already mounted"), "{err}");
    let err = imgfs_err(
        &cache,
        &[
            "mount",
            &format!("{}/mount/nope:v1", reg.host),
            work.path().join("mnt2").to_str().unwrap(),
        ],
    );
    assert!(err.contains("no such directory"), "{err}");
    std::fs::create_dir(work.path().join("mnt2")).unwrap();
    let err = imgfs_err(
        &cache,
        &[
            "mount",
            &format!("{}/mount/nope:v1", reg.host),
            work.path().join("mnt2").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("daemon failed") && err.contains("not found"),
        "{err}"
    );
    m.unmount(&cache);
}

#[test]
fn zstd_and_uncompressed_layers_mount_like_they_pull() {
    let reg = registry();
    let big: Vec<u8> = noise(4_500_000, 11)
        .into_iter()
        .zip(text(4_500_000, 12))
        .flat_map(|(a, b)| [a, b])
        .collect();
    let l1 = Tar::new()
        .dir("z", 0o755)
        .file("z/big", 0o644, &big)
        .file("z/small", 0o600, b"tiny")
        .bytes();
    let l2 = Tar::new()
        .whiteout("z/small")
        .file("z/plain", 0o644, b"from an uncompressed layer")
        .bytes();
    // Two zstd frames in one layer: a seek point mid-layer.
    let half = l1.len() / 2;
    let mut zst = zstd::encode_all(&l1[..half], 3).unwrap();
    zst.extend(zstd::encode_all(&l1[half..], 3).unwrap());
    let layers = vec![
        FixtureLayer {
            diff_id: imgfs::digest::Digest::of(&l1),
            blob: zst,
            media_type: imgfs::manifest::media::OCI_LAYER_ZSTD,
            annotations: Default::default(),
        },
        FixtureLayer::plain_tar(l2),
    ];
    FixtureImage::new("amd64", layers).push(&reg.host, "mount/zstd", "v1");
    let image = format!("{}/mount/zstd:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let pulled = work.path().join("pulled");
    imgfs_ok(&cache, &["pull", "-q", &image, pulled.to_str().unwrap()]);
    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), &[]);
    assert_same_tree(&m.dir, &pulled, "zstd mount vs pull");
    assert_eq!(std::fs::read(m.dir.join("z/big")).unwrap(), big);
    m.unmount(&cache);
}

#[test]
fn a_directory_larger_than_one_readdir_buffer_lists_completely() {
    let reg = registry();
    let mut t = Tar::new().dir("many", 0o755);
    let names: Vec<String> = (0..3000)
        .map(|i| format!("entry-with-a-longish-name-{i:05}"))
        .collect();
    for n in &names {
        t = t.file(&format!("many/{n}"), 0o644, b"");
    }
    FixtureImage::new("amd64", vec![FixtureLayer::from_tar(t.bytes())]).push(
        &reg.host,
        "mount/many",
        "v1",
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let m = Mounted::new(
        &cache,
        &format!("{}/mount/many:v1", reg.host),
        &work.path().join("mnt"),
        &[],
    );
    // The second listing comes from the kernel's cache of the first.
    for pass in ["first", "cached"] {
        let mut listed: Vec<String> = std::fs::read_dir(m.dir.join("many"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        assert_eq!(
            listed, names,
            "{pass} listing: every entry once, none lost across readdir calls"
        );
    }
    m.unmount(&cache);
}

#[test]
fn a_mount_right_after_an_unmount_stays_mounted() {
    // `imgfs umount` returns once the mount is gone; the old daemon exits a moment later.
    // It must not take the next mount on the same directory down with it.
    let reg = registry();
    FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"again")])]).push(
        &reg.host,
        "mount/again",
        "v1",
    );
    let image = format!("{}/mount/again:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let dir = work.path().join("mnt");
    let mut old = Mounted::new(&cache, &image, &dir, &[]);
    let signal = |pid: i32, sig| {
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), sig).unwrap()
    };
    for _ in 0..2 {
        // The old daemon is held still until the new mount is up, so that it notices the
        // unmount only afterwards, whatever the timing.
        signal(old.pid, rustix::process::Signal::STOP);
        imgfs_ok(&cache, &["umount", dir.to_str().unwrap()]);
        let m = Mounted::new(&cache, &image, &dir, &[]);
        signal(old.pid, rustix::process::Signal::CONT);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while old.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!old.alive(), "the old daemon still runs");
        // (Its Drop would unmount whatever is mounted on the directory: the new mount.)
        std::mem::forget(old);
        assert!(is_mounted(&dir), "the new mount was taken down");
        assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"again");
        old = m;
    }
    old.unmount(&cache);
}
