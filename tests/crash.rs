//! kill -9 in the middle of the work — during a pull, during indexing, during a mount's reads —
//! then run again: the cache holds nothing half-written under a real name, nothing is left
//! where the user looks, and the rerun succeeds with the right result.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::compare::assert_same_tree;
use common::layers::Tar;
use common::mounted::{Mounted, is_mounted};
use common::proxy::{Fault, Proxy};
use common::*;

const MIB: usize = 1 << 20;
const SLOW: Fault = Fault::Trickle(Duration::from_millis(15));

fn spawn(cache: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imgfs"))
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn kill_after(mut child: Child, after: Duration) {
    std::thread::sleep(after);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn image(repo: &str) -> (FixtureImage, String, Proxy) {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::gzip(&[("a/noise", &noise(2 * MIB, 1)), ("a/t", b"text")]),
            FixtureLayer::gzip(&[("b/noise", &noise(2 * MIB, 2))]),
        ],
    );
    img.push(&reg.host, repo, "v1");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/{repo}:v1", proxy.host);
    (img, image, proxy)
}

#[test]
fn a_pull_killed_mid_download_leaves_nothing_used_and_the_rerun_succeeds() {
    let (_img, image, proxy) = image("crash/pull");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let parent = work.path().join("parent");
    std::fs::create_dir(&parent).unwrap();
    let target = parent.join("rootfs");

    proxy.fault_next_blobs(10, SLOW);
    kill_after(
        spawn(&cache, &["pull", "-q", &image, target.to_str().unwrap()]),
        Duration::from_millis(1200),
    );
    assert!(!target.exists(), "a killed pull left its target");
    assert!(
        std::fs::read_dir(&parent).unwrap().count() == 1,
        "the killed pull's build directory is there (this test kills it mid-work)"
    );
    assert_cache_names_verify(&cache);

    proxy.fault_next_blobs(0, SLOW);
    imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
    let clean = work.path().join("clean");
    imgfs_ok(
        &work.path().join("clean-cache"),
        &["pull", "-q", &image, clean.to_str().unwrap()],
    );
    assert_same_tree(&target, &clean, "pull after a killed pull");
    let left: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec!["rootfs"],
        "the abandoned build directory is removed"
    );
    assert_cache_names_verify(&cache);
}

#[test]
fn indexing_killed_midway_stores_no_index_and_the_rerun_succeeds() {
    let (img, image, proxy) = image("crash/index");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    proxy.fault_next_blobs(10, SLOW);
    kill_after(spawn(&cache, &["ls", &image]), Duration::from_millis(1200));
    assert_cache_names_verify(&cache);
    let indexed = std::fs::read_dir(cache.join("indexes/sha256"))
        .into_iter()
        .flatten()
        .count();
    assert!(
        indexed < img.layers.len(),
        "the kill came too late to test anything"
    );

    proxy.fault_next_blobs(0, SLOW);
    let out = imgfs_ok(&cache, &["ls", "-R", &image]);
    assert!(
        out.contains("/a:") && out.lines().any(|l| l == "t"),
        "{out}"
    );
    assert_cache_names_verify(&cache);
}

#[test]
fn a_mount_daemon_killed_mid_read_leaves_a_sound_cache_and_mounts_again() {
    let reg = registry();
    let big = noise(6 * MIB, 3);
    let img = FixtureImage::new(
        "amd64",
        vec![FixtureLayer::from_tar(
            Tar::new().file("big", 0o644, &big).bytes(),
        )],
    );
    img.push(&reg.host, "crash/mount", "v1");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/crash/mount:v1", proxy.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &image]);
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &["--prefetch", "none"]);

    proxy.fault_next_blobs(10, SLOW);
    let reader = {
        let p = mnt.join("big");
        std::thread::spawn(move || std::fs::read(p))
    };
    std::thread::sleep(Duration::from_millis(500));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(m.pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let read = reader.join().unwrap();
    assert!(
        read.is_err(),
        "a read through a killed daemon cannot succeed"
    );
    assert_cache_names_verify(&cache);

    // The dead mount is named as such, removed by `imgfs umount`, and a new mount serves
    // the right bytes.
    proxy.fault_next_blobs(0, SLOW);
    let err = imgfs_err(&cache, &["mount", &image, mnt.to_str().unwrap()]);
    assert!(
        err.contains("daemon is gone") && err.contains("imgfs umount"),
        "{err}"
    );
    imgfs_ok(&cache, &["umount", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    let m2 = Mounted::new(&cache, &image, &mnt, &[]);
    assert!(std::fs::read(mnt.join("big")).unwrap() == big);
    m2.unmount(&cache);
    assert_cache_names_verify(&cache);
    drop(m);
}
