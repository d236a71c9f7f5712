//! A hostile network between imgfs and the real registry (tests/common/proxy.rs): delays,
//! flipped bytes, `Content-Length` lies, cuts, 429/503 with `Retry-After`. A pull ends in the
//! clean tree or a clear error with nothing left behind and nothing unverified in the cache;
//! a mount answers each read with the right bytes or EIO, keeps serving other files and
//! listings meanwhile (slow reads never block the FUSE loop), and recovers when the fault
//! stops.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::compare::assert_same_tree;
use common::layers::Tar;
use common::mounted::Mounted;
use common::proxy::{Fault, Proxy};
use common::*;

const MIB: usize = 1 << 20;

/// Everything named in `cache` verifies, and no temporary file is left.
fn assert_cache_sound(cache: &Path, what: &str) {
    assert_cache_names_verify(cache);
    let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .into_iter()
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "{what}: temporary files left: {tmp:?}");
}

#[test]
fn pull_through_each_fault_gives_the_clean_tree_or_a_clear_error() {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::gzip(&[("a/noise", &noise(600_000, 1)), ("a/t", b"text")]),
            FixtureLayer::gzip(&[("b/noise", &noise(500_000, 2))]),
        ],
    );
    img.push(&reg.host, "chaos/pull", "v1");
    let work = tempfile::tempdir().unwrap();
    let clean = work.path().join("clean");
    imgfs_ok(
        &work.path().join("clean-cache"),
        &[
            "pull",
            "-q",
            &format!("{}/chaos/pull:v1", reg.host),
            clean.to_str().unwrap(),
        ],
    );

    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/chaos/pull:v1", proxy.host);
    // (what, how many blob GETs, fault or a cut, expected: None = the clean tree, Some(word)
    // = an error saying it)
    let cases: Vec<(&str, usize, Option<Fault>, Option<&str>)> = vec![
        (
            "delay",
            2,
            Some(Fault::Delay(Duration::from_millis(1500))),
            None,
        ),
        ("length too long", 1, Some(Fault::LengthPlus(1000)), None),
        ("length too short", 1, Some(Fault::LengthMinus(1000)), None),
        ("503 then fine", 2, Some(Fault::Status(503)), None),
        ("429 then fine", 2, Some(Fault::Status(429)), None),
        ("reset mid-body", 1, None, None),
        (
            "flipped byte",
            1,
            Some(Fault::Flip),
            Some("digest mismatch"),
        ),
        ("503 for good", 50, Some(Fault::Status(503)), Some("503")),
    ];
    for (i, (what, n, fault, expect)) in cases.into_iter().enumerate() {
        match fault {
            Some(f) => proxy.fault_next_blobs(n, f),
            None => proxy.cut_next_blob_gets(n, 100_000),
        }
        let cache = work.path().join(format!("cache{i}"));
        let target = work.path().join(format!("out{i}"));
        let out = imgfs(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match expect {
            None => {
                assert!(out.status.success(), "{what}: {stderr}");
                assert_same_tree(&target, &clean, what);
            }
            Some(word) => {
                assert!(!out.status.success(), "{what}: succeeded");
                assert!(stderr.contains(word), "{what}: {stderr}");
                assert!(!target.exists(), "{what}: a failed pull left {target:?}");
            }
        }
        assert_cache_sound(&cache, what);
        let builds = pull_build_dirs(work.path());
        assert!(
            builds.is_empty(),
            "{what}: build directory left: {builds:?}"
        );
        proxy.fault_next_blobs(0, Fault::Flip);
        proxy.cut_next_blob_gets(0, 0);
    }
}

#[test]
fn a_mount_serves_right_bytes_or_eio_never_blocks_and_recovers() {
    let reg = registry();
    let files: Vec<(String, Vec<u8>)> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("d/{n}"), noise(5 * MIB, 10 + i as u64)))
        .collect();
    let mut tar = Tar::new().dir("d", 0o755);
    for (p, d) in &files {
        tar = tar.file(p, 0o644, d);
    }
    let img = FixtureImage::new("amd64", vec![FixtureLayer::from_tar(tar.bytes())]);
    img.push(&reg.host, "chaos/mount", "v1");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/chaos/mount:v1", proxy.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // Index cleanly first (and keep no span): the faults below hit range reads.
    imgfs_ok(&cache, &["index", "build", &image]);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&cache, &image, &mnt, &["--prefetch", "none"]);
    let path = |i: usize| mnt.join(&files[i].0);

    // Every attempt at a's span gets flipped bytes: EIO, never wrong bytes.
    proxy.fault_next_blobs(100, Fault::Flip);
    let err = std::fs::read(path(0)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The mount goes on: another file reads right, and a recovers once the fault is gone.
    proxy.fault_next_blobs(0, Fault::Flip);
    assert!(std::fs::read(path(1)).unwrap() == files[1].1);
    assert!(std::fs::read(path(0)).unwrap() == files[0].1);

    // A read stalled on the network does not stall listings and lookups.
    proxy.fault_next_blobs(1, Fault::Delay(Duration::from_secs(3)));
    let slow = {
        let p = path(2);
        std::thread::spawn(move || {
            let t = Instant::now();
            (std::fs::read(p), t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let t = Instant::now();
        let names = std::fs::read_dir(mnt.join("d")).unwrap().count();
        std::fs::metadata(path(1)).unwrap();
        assert_eq!(names, 3);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "a listing waited {:?} behind a slow read",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (data, took) = slow.join().unwrap();
    assert!(data.unwrap() == files[2].1);
    assert!(
        took >= Duration::from_secs(2),
        "the read was slowed: {took:?}"
    );

    // Transient server errors on a read are retried.
    let extra = work.path().join("extra-cache");
    imgfs_ok(&extra, &["index", "build", &image]);
    proxy.fault_next_blobs(2, Fault::Status(503));
    let out = imgfs(&extra, &["cat", &image, "d/b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == files[1].1);

    m.unmount(&cache);
    assert_cache_sound(&cache, "after the mount");
}
