//! `imgfs store`: the Additional Layer Store layout containers/storage reads (layer trees in
//! overlayfs form, the layer record, the blob, the use protocol), what it says about layers
//! it cannot serve, and podman (Debian's 4.3, runc, cgroupfs) running an image from it
//! without downloading a layer blob.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::layers::Tar;
use common::mounted::is_mounted;
use common::show::{show_binary, two_layers};
use common::*;

/// A store served by `imgfs store --foreground`, stopped when dropped.
struct Served {
    dir: PathBuf,
    child: Child,
}

impl Served {
    fn start(cache: &Path, dir: &Path, extra: &[&str]) -> Served {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_imgfs"))
            .arg("--cache-dir")
            .arg(cache)
            .args(["store", "--foreground", dir.to_str().unwrap()])
            .args(extra)
            .env("DOCKER_CONFIG", cache.join("no-docker-config"))
            .env("REGISTRY_AUTH_FILE", cache.join("no-auth.json"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(dir) {
            assert!(Instant::now() < deadline, "the store never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Served {
            dir: dir.to_path_buf(),
            child,
        }
    }

    /// The directory of `reference`'s layer `digest`.
    fn layer(&self, reference: &str, digest: &str) -> PathBuf {
        let b64 = base64::engine::general_purpose::STANDARD.encode(reference);
        self.dir.join(b64).join(digest)
    }

    fn status(&self) -> String {
        std::fs::read_to_string(self.dir.join(".status")).unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[test]
fn layers_are_served_in_overlay_form_with_their_record() {
    let reg = registry();
    let (lower, upper) = two_layers(b"#!/bin/sh\n");
    let img = FixtureImage::new("amd64", vec![lower.clone(), upper.clone()]);
    img.push(&reg.host, "store/form", "v1");
    let reference = format!("{}/store/form:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let store = Served::start(&cache, &work.path().join("als"), &[]);

    let up = store.layer(&reference, &upper.digest().to_string());
    // The layer record containers/storage reads.
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.join("info")).unwrap()).unwrap();
    assert_eq!(info["compressed-diff-digest"], upper.digest().to_string());
    assert_eq!(info["compressed-size"], upper.blob.len());
    assert_eq!(info["diff-digest"], upper.diff_id.to_string());
    assert_eq!(info["compression"], 2);
    // The upper layer alone, in overlayfs form.
    let diff = up.join("diff");
    assert_eq!(
        std::fs::read(diff.join("etc/top")).unwrap(),
        b"from the upper layer\n"
    );
    let wh = std::fs::symlink_metadata(diff.join("etc/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "a whiteout is a character device"
    );
    assert_eq!(wh.rdev(), 0, "… numbered 0/0");
    assert!(!diff.join("etc/base").exists(), "only this layer's files");
    assert_eq!(
        xattr(&diff.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        std::fs::metadata(diff.join("opq")).unwrap().mode() & 0o7777,
        0o711
    );
    assert!(!diff.join("opq/.wh..wh..opq").exists());
    assert!(xattr(&diff.join("etc"), "trusted.overlay.opaque").is_none());
    // The compressed blob, as the registry has it.
    assert_eq!(std::fs::read(up.join("blob")).unwrap(), upper.blob);
    // The use protocol: creating `use` answers "not there" (counted); removing the layer
    // directory releases, and the layer is still served.
    let used = std::fs::File::create(up.join("use")).unwrap_err();
    assert_eq!(used.raw_os_error(), Some(libc::ENOENT), "{used}");
    let released = std::fs::remove_dir(&up).unwrap_err();
    assert_eq!(released.raw_os_error(), Some(libc::ENOENT), "{released}");
    assert!(up.join("diff/etc/top").exists());

    // The lower layer: plain files.
    let low = store.layer(&reference, &lower.digest().to_string());
    assert_eq!(
        std::fs::read(low.join("diff/etc/base")).unwrap(),
        b"from the lower layer\n"
    );
    assert!(store.status().contains("served 2"), "{}", store.status());
}

#[test]
fn layers_it_cannot_serve_are_absent_and_said_why() {
    let reg = registry();
    let (lower, upper) = two_layers(b"x");
    let img = FixtureImage::new("amd64", vec![lower.clone(), upper]);
    img.push(&reg.host, "store/refuse", "v1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let store = Served::start(&cache, &work.path().join("als"), &[]);

    // A digest the image does not have, a repository that does not exist, a name that is not
    // base64: absent (containers/storage then pulls the layer itself).
    let reference = format!("{}/store/refuse:v1", reg.host);
    let other = format!("sha256:{}", "ab".repeat(32));
    assert!(!store.layer(&reference, &other).join("diff").exists());
    let missing = format!("{}/store/nothing:v1", reg.host);
    assert!(!store.layer(&missing, &lower.digest().to_string()).exists());
    assert!(!store.dir.join("not base64!").join(&other).exists());
    let status = store.status();
    assert!(status.contains("refused 2"), "{status}");
    assert!(status.contains("not in the image"), "{status}");
    assert!(status.contains("store/nothing:v1"), "{status}");
    // And the store keeps serving.
    assert!(
        store
            .layer(&reference, &lower.digest().to_string())
            .join("diff/etc/base")
            .exists()
    );
}

#[test]
fn estargz_layers_are_found_by_blob_and_by_toc_digest() {
    let reg = registry();
    let entries = vec![
        common::estargz::Entry::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        common::estargz::Entry::File {
            path: "etc/os".into(),
            mode: 0o644,
            data: b"lazy\n".to_vec(),
        },
    ];
    let e = common::estargz::build(&entries, 4096, &[]);
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        e.toc_digest.to_string().into(),
    );
    let layer = FixtureLayer {
        blob: e.blob.clone(),
        media_type: imgfs::manifest::media::OCI_LAYER_GZIP,
        diff_id: e.diff_id.clone(),
        annotations,
    };
    FixtureImage::new("amd64", vec![layer]).push(&reg.host, "store/esgz", "v1");
    let reference = format!("{}/store/esgz:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let store = Served::start(&work.path().join("cache"), &work.path().join("als"), &[]);
    // podman 4.3 asks by blob digest, podman 5.1 and later by TOC digest.
    for name in [e.digest().to_string(), e.toc_digest.to_string()] {
        let dir = store.layer(&reference, &name);
        assert_eq!(
            std::fs::read(dir.join("diff/etc/os")).unwrap(),
            b"lazy\n",
            "{name}"
        );
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("info")).unwrap()).unwrap();
        assert_eq!(info["compressed-diff-digest"], e.digest().to_string());
    }
}

#[test]
fn a_layer_that_needs_a_lower_one_or_an_unreachable_registry_is_refused() {
    let reg = registry();
    let lower = FixtureLayer::from_tar(Tar::new().file("base", 0o644, b"base\n").bytes());
    // A hard link to a file of the layer below: this layer cannot be shown alone.
    let upper = FixtureLayer::from_tar(Tar::new().hardlink("link", "base").bytes());
    FixtureImage::new("amd64", vec![lower.clone(), upper.clone()]).push(
        &reg.host,
        "store/link",
        "v1",
    );
    let reference = format!("{}/store/link:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let store = Served::start(&work.path().join("cache"), &work.path().join("als"), &[]);
    assert!(
        !store
            .layer(&reference, &upper.digest().to_string())
            .exists()
    );
    assert!(
        store
            .layer(&reference, &lower.digest().to_string())
            .join("diff/base")
            .exists()
    );
    // Nothing listens on this port.
    let dead = format!("127.0.0.1:{}/store/link:v1", free_port());
    assert!(!store.layer(&dead, &lower.digest().to_string()).exists());
    let status = store.status();
    assert!(
        status.contains("refused 2") && status.contains("served 1"),
        "{status}"
    );
    assert!(status.contains("link"), "the hard link is named: {status}");
    assert!(status.contains(&dead), "{status}");
}

#[test]
fn many_references_at_once_and_a_corrupt_span_never_give_wrong_bytes() {
    let reg = registry();
    let proxy = proxy::Proxy::start(&reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // Three images with a layer each, the third's file big enough to span several reads.
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| noise(200_000 + i * 1000, i as u64))
        .collect();
    let mut refs = Vec::new();
    for (i, data) in files.iter().enumerate() {
        let layer = FixtureLayer::gzip(&[("data.bin", data)]);
        FixtureImage::new("amd64", vec![layer.clone()]).push(
            &reg.host,
            &format!("store/many{i}"),
            "v1",
        );
        let reference = format!("{}/store/many{i}:v1", proxy.host);
        // Indexed beforehand: the store reads by range.
        imgfs_ok(&cache, &["index", "build", &reference]);
        refs.push((reference, layer.digest().to_string()));
    }
    let store = Served::start(&cache, &work.path().join("als"), &[]);
    let paths: Vec<PathBuf> = refs
        .iter()
        .map(|(r, d)| store.layer(r, d).join("diff/data.bin"))
        .collect();
    // Every span of the first image comes back damaged: its read fails (EIO, no bytes);
    // then the other two, looked up and read at once from two threads, are right.
    proxy.corrupt_next_ranges(1000);
    let first = std::fs::read(&paths[0]);
    assert_eq!(first.unwrap_err().raw_os_error(), Some(libc::EIO));
    proxy.corrupt_next_ranges(0);
    let readers: Vec<_> = paths[1..]
        .iter()
        .cloned()
        .map(|p| std::thread::spawn(move || std::fs::read(p).unwrap()))
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        assert!(r.join().unwrap() == files[i + 1], "image {}", i + 1);
    }
    // And the damaged one reads right once its bytes are.
    assert!(std::fs::read(&paths[0]).unwrap() == files[0]);
}

#[test]
fn the_store_runs_as_a_daemon_until_umount() {
    let reg = registry();
    let layer = FixtureLayer::gzip(&[("etc/motd", b"daemon\n")]);
    FixtureImage::new("amd64", vec![layer.clone()]).push(&reg.host, "store/daemon", "v1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let dir = work.path().join("als");
    std::fs::create_dir_all(&dir).unwrap();
    let out = imgfs(&cache, &["store", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = common::mounted::Mounted {
        dir: dir.clone(),
        pid: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the daemon's pid"),
    };
    let b64 =
        base64::engine::general_purpose::STANDARD.encode(format!("{}/store/daemon:v1", reg.host));
    let motd = dir
        .join(b64)
        .join(layer.digest().to_string())
        .join("diff/etc/motd");
    assert_eq!(std::fs::read(motd).unwrap(), b"daemon\n");
    m.unmount(&cache);
}

#[test]
fn podman_pulls_a_layer_the_store_cannot_serve_and_the_store_says_why() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&show_binary(work.path()));
    FixtureImage::new("amd64", vec![lower.clone(), upper]).push(&reg.host, "store/mixed", "v1");
    let reference = format!("{}/store/mixed:v1", reg.host);
    // The lower layer (a static program) expands past the store's limit: refused, and
    // pulled by podman; the upper one is served.
    let store = Served::start(
        &work.path().join("cache"),
        &work.path().join("als"),
        &["--max-uncompressed-size", "64KiB"],
    );
    let podman = Podman::new(work.path(), &store.dir);
    let out = podman.run(&[
        "run",
        "--rm",
        "--tls-verify=false",
        "--network=none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &reference,
        "/bin/show",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, common::show::SHOWN);
    let status = store.status();
    assert!(
        status.contains("served 1") && status.contains("refused 1"),
        "{status}"
    );
    assert!(
        status.contains(&lower.digest().to_string()) && status.contains("max-uncompressed-size"),
        "{status}"
    );
    let _ = podman.run(&["rmi", "-a", "-f"]);
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", name])
        .arg(path)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// podman with a private storage root whose storage.conf names the store, talking to the
/// test registry over plain HTTP.
struct Podman {
    root: PathBuf,
    conf: PathBuf,
}

impl Podman {
    fn new(work: &Path, store: &Path) -> Podman {
        let root = work.join("podman");
        std::fs::create_dir_all(root.join("graph")).unwrap();
        let conf = root.join("storage.conf");
        std::fs::write(
            &conf,
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n\
                 [storage.options]\nadditionallayerstores = [\"{1}:ref\"]\n",
                root.display(),
                store.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
        Podman { root, conf }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("podman")
            .env("CONTAINERS_STORAGE_CONF", &self.conf)
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.root.join("registries.conf"),
            )
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager=cgroupfs",
                "--events-backend=file",
            ])
            .args(["--tmpdir", self.root.join("tmp").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }
}

#[test]
fn podman_runs_an_image_from_the_store_without_downloading_its_layers() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&show_binary(work.path()));
    let img = FixtureImage::new("amd64", vec![lower.clone(), upper.clone()]);
    img.push(&reg.host, "store/run", "v1");
    let cache = work.path().join("cache");
    // podman and the store both go through a counting proxy; the indexes are made
    // beforehand (as a published index would provide them), so the store reads by range.
    let proxy = proxy::Proxy::start(&reg.host);
    let reference = format!("{}/store/run:v1", proxy.host);
    imgfs_ok(&cache, &["index", "build", &reference]);
    let store = Served::start(&cache, &work.path().join("als"), &[]);
    proxy.reset_counts();

    let podman = Podman::new(work.path(), &store.dir);
    let out = podman.run(&[
        "run",
        "--rm",
        "--tls-verify=false",
        "--network=none",
        // The defaults (from the host's hard limits) are refused in this sandbox.
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &reference,
        "/bin/show",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podman run: {stdout}\n{}\nstore: {}",
        String::from_utf8_lossy(&out.stderr),
        store.status()
    );
    assert_eq!(stdout, common::show::SHOWN);
    let whole_blob_gets: Vec<String> = proxy
        .log()
        .into_iter()
        .filter(|l| {
            [lower.digest(), upper.digest()]
                .iter()
                .any(|d| l.contains(&d.to_string()))
                && l.starts_with("GET")
                && !l.to_lowercase().contains("range")
        })
        .collect();
    assert!(
        whole_blob_gets.is_empty(),
        "podman downloaded layers: {whole_blob_gets:?}"
    );
    assert!(store.status().contains("served 2"), "{}", store.status());
    let _ = podman.run(&["rmi", "-a", "-f"]);
}
