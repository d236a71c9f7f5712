//! `imgfs snapshotter`: containerd (Debian's 1.6, a private daemon with the CRI plugin off)
//! starts containers through it without downloading layers; the CRI labels' path, called as
//! containerd's CRI plugin would call it; fallbacks that containerd unpacks, counted with
//! their reasons; and a restart after `kill -9`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::show::{SHOWN, show_binary, two_layers};
use common::*;
use imgfs::snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use imgfs::snapshotter::api::snapshots::{self as pb};

/// `imgfs snapshotter` in the foreground, killed when dropped.
struct Snapshotter {
    cache: PathBuf,
    root: PathBuf,
    sock: PathBuf,
    child: Child,
}

impl Snapshotter {
    fn start(cache: &Path, dir: &Path) -> Snapshotter {
        let (root, sock) = (dir.join("root"), dir.join("snapshotter.sock"));
        let child = Snapshotter::spawn(cache, &root, &sock);
        Snapshotter {
            cache: cache.to_path_buf(),
            root,
            sock,
            child,
        }
    }

    fn spawn(cache: &Path, root: &Path, sock: &Path) -> Child {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(env!("CARGO_BIN_EXE_imgfs"))
            .arg("--cache-dir")
            .arg(cache)
            .arg("snapshotter")
            .arg("--address")
            .arg(sock)
            .arg("--root")
            .arg(root)
            .env("DOCKER_CONFIG", cache.join("no-docker-config"))
            .env("REGISTRY_AUTH_FILE", cache.join("no-auth.json"))
            .env("RUST_LOG", "imgfs=info")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "the snapshotter never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// `kill -9`, then a new daemon on the same root and socket.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Snapshotter::spawn(&self.cache, &self.root, &self.sock);
    }

    fn status(&self) -> String {
        std::fs::read_to_string(self.root.join("status")).unwrap()
    }

    /// containerd's config naming this snapshotter `imgfs`.
    fn proxy_plugin(&self) -> String {
        format!(
            "[proxy_plugins]\n  [proxy_plugins.imgfs]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            self.sock.display()
        )
    }

    fn client(&self) -> SnapshotsClient<tonic::transport::Channel> {
        let sock = self.sock.clone();
        rt().block_on(async move {
            let channel = tonic::transport::Endpoint::try_from("http://[::]:0")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_| {
                    let sock = sock.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(sock).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .unwrap();
            SnapshotsClient::new(channel)
        })
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        terminate(&mut self.child);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed daemon's mount, if any.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.root.join("layers"))
            .stderr(Stdio::null())
            .status();
    }
}

/// `ctr run` of `/bin/show` in a new container of `reference` on the snapshotter.
fn run_show(c: &Containerd, reference: &str, id: &str) -> String {
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "imgfs",
        reference,
        id,
        "/bin/show",
    ]);
    assert!(
        out.status.success(),
        "ctr run: {}\n{}\ncontainerd: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Requests for a whole blob (no Range) of any of `layers` in the proxy's log.
fn whole_blob_gets(proxy: &proxy::Proxy, layers: &[String]) -> Vec<String> {
    proxy
        .log()
        .into_iter()
        .filter(|l| {
            layers.iter().any(|d| l.contains(d))
                && l.starts_with("GET")
                && !l.to_lowercase().contains("range")
        })
        .collect()
}

#[test]
fn containerd_runs_an_image_without_downloading_its_layers_and_again_after_a_kill() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&show_binary(work.path()));
    let layers = [lower.digest().to_string(), upper.digest().to_string()];
    FixtureImage::new("amd64", vec![lower, upper]).push(&reg.host, "snap/run", "v1");
    let proxy = proxy::Proxy::start(&reg.host);
    let reference = format!("{}/snap/run:v1", proxy.host);
    // A published index, as a fleet would have: the snapshotter reads the layers by range.
    let pusher = work.path().join("pusher");
    imgfs_ok(&pusher, &["index", "push", &reference]);
    let cache = work.path().join("cache");
    let mut snap = Snapshotter::start(&cache, work.path());
    let c = Containerd::start_with(&snap.proxy_plugin());
    proxy.reset_counts();

    rpull(&c, &reference);
    assert_eq!(run_show(&c, &reference, "first"), SHOWN);
    let gets = whole_blob_gets(&proxy, &layers);
    assert!(gets.is_empty(), "layers were downloaded whole: {gets:?}");
    assert!(
        snap.status().starts_with("served lazily 2\n"),
        "{}",
        snap.status()
    );

    snap.kill_and_restart();
    // containerd reconnects to a proxy plugin with a backoff of up to 3 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = c.ctr(&["snapshots", "--snapshotter", "imgfs", "ls"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "containerd never reconnected");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(run_show(&c, &reference, "after-kill"), SHOWN);
}

/// The labels `ctr-remote image rpull` gives the Prepare of `layer` of `reference`.
fn stargz_labels(target: &str, reference: &str, layer: &str) -> Vec<(&'static str, String)> {
    vec![
        ("containerd.io/snapshot.ref", target.into()),
        (
            "containerd.io/snapshot/remote/stargz.reference",
            reference.into(),
        ),
        ("containerd.io/snapshot/remote/stargz.digest", layer.into()),
    ]
}

/// `ctr-remote image rpull` of `reference` onto the snapshotter.
fn rpull(c: &Containerd, reference: &str) {
    c.ctr_ok(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "imgfs",
        reference,
    ]);
}

fn prepare(
    client: &mut SnapshotsClient<tonic::transport::Channel>,
    key: &str,
    parent: &str,
    labels: &[(&str, String)],
) -> Result<Vec<imgfs::snapshotter::api::types::Mount>, tonic::Status> {
    let labels: HashMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    rt().block_on(client.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "imgfs".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    }))
    .map(|r| r.into_inner().mounts)
}

fn stat(
    client: &mut SnapshotsClient<tonic::transport::Channel>,
    key: &str,
) -> Result<pb::Info, tonic::Status> {
    rt().block_on(client.stat(pb::StatSnapshotRequest {
        snapshotter: "imgfs".into(),
        key: key.into(),
    }))
    .map(|r| r.into_inner().info.unwrap())
}

#[test]
fn cri_labels_commit_lazy_layers_and_unknown_ones_fall_back_with_a_reason() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(b"#!/bin/sh\n");
    let (l0, l1) = (lower.digest().to_string(), upper.digest().to_string());
    let img = FixtureImage::new("amd64", vec![lower, upper]);
    let manifest = img.push(&reg.host, "snap/cri", "v1").to_string();
    let reference = format!("{}/snap/cri:v1", reg.host);
    let snap = Snapshotter::start(&work.path().join("cache"), work.path());
    let mut client = snap.client();
    let cri = |target: &'static str, layer: &str| -> Vec<(&'static str, String)> {
        vec![
            ("containerd.io/snapshot.ref", target.to_string()),
            ("containerd.io/snapshot/cri.image-ref", reference.clone()),
            ("containerd.io/snapshot/cri.layer-digest", layer.to_string()),
            (
                "containerd.io/snapshot/cri.manifest-digest",
                manifest.clone(),
            ),
        ]
    };

    // Each layer: ALREADY_EXISTS, and the target committed (what containerd then finds).
    let e = prepare(&mut client, "extract-1 chain-a", "", &cri("chain-a", &l0)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let e = prepare(
        &mut client,
        "extract-2 chain-b",
        "chain-a",
        &cri("chain-b", &l1),
    )
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let info = stat(&mut client, "chain-b").unwrap();
    assert_eq!(info.kind, pb::Kind::Committed as i32);
    assert_eq!(info.parent, "chain-a");
    assert!(
        stat(&mut client, "extract-2 chain-b").is_err(),
        "no active snapshot was left"
    );

    // A container's snapshot on top: overlayfs over the two lazy layers, top first, whose
    // directories hold the layers' files in overlayfs form.
    let mounts = prepare(&mut client, "container", "chain-b", &[]).unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "overlay");
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    let lowers: Vec<&str> = lowerdir.split(':').collect();
    assert_eq!(lowers.len(), 2);
    assert_eq!(
        std::fs::read(Path::new(lowers[0]).join("etc/top")).unwrap(),
        b"from the upper layer\n"
    );
    assert_eq!(
        std::fs::read(Path::new(lowers[1]).join("etc/base")).unwrap(),
        b"from the lower layer\n"
    );
    use std::os::unix::fs::FileTypeExt;
    let gone = std::fs::symlink_metadata(Path::new(lowers[0]).join("etc/gone")).unwrap();
    assert!(
        gone.file_type().is_char_device(),
        "a whiteout in overlayfs form"
    );

    // A digest the image lacks: an ordinary snapshot containerd unpacks into, and the
    // reason counted; never ALREADY_EXISTS.
    let unknown = format!("sha256:{}", "0".repeat(64));
    let mounts = prepare(
        &mut client,
        "extract-3 chain-x",
        "",
        &cri("chain-x", &unknown),
    )
    .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    let status = snap.status();
    assert!(
        status.contains("unpacked by containerd (fallbacks) 1"),
        "{status}"
    );
    assert!(
        status.contains(&unknown) && status.contains("not in the image"),
        "{status}"
    );

    // An unpack without image labels (CRI's annotations off) falls back too, saying why.
    let mounts = prepare(
        &mut client,
        "extract-4 chain-y",
        "",
        &[("containerd.io/snapshot.ref", "chain-y".to_string())],
    )
    .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    assert!(
        snap.status().contains("disable_snapshot_annotations"),
        "{}",
        snap.status()
    );

    // The overlay snapshotter's rules: a parent with children stays; a missing key is NOT_FOUND.
    let e = rt()
        .block_on(client.remove(pb::RemoveSnapshotRequest {
            snapshotter: "imgfs".into(),
            key: "chain-a".into(),
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        stat(&mut client, "nothing").unwrap_err().code(),
        tonic::Code::NotFound
    );
    let e = prepare(&mut client, "on-active", "container", &[]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[test]
fn an_image_without_an_index_and_an_estargz_one_both_run() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&show_binary(work.path()));
    FixtureImage::new("amd64", vec![lower, upper]).push(&reg.host, "snap/cold", "v1");
    let proxy = proxy::Proxy::start(&reg.host);
    let cold = format!("{}/snap/cold:v1", proxy.host);
    let estargz = format!("{}/snap/cold:estargz", proxy.host);
    let snap = Snapshotter::start(&work.path().join("cache"), work.path());
    let c = Containerd::start_with(&snap.proxy_plugin());
    // The eStargz twin, made by stargz-snapshotter's converter.
    c.ctr_ok(&["images", "pull", "--plain-http", &cold]);
    c.ctr_ok(&["images", "convert", "--estargz", "--oci", &cold, &estargz]);
    c.ctr_ok(&["images", "push", "--plain-http", &estargz, &estargz]);
    c.ctr_ok(&["images", "rm", &cold, &estargz]);

    // No index anywhere: the snapshotter streams each layer once to index it.
    rpull(&c, &cold);
    assert_eq!(run_show(&c, &cold, "cold"), SHOWN);
    // eStargz: the layers' tables of contents, then their chunks, by range.
    proxy.reset_counts();
    rpull(&c, &estargz);
    assert_eq!(run_show(&c, &estargz, "estargz"), SHOWN);
    let layers = layer_digests(&inspect_json(&work.path().join("inspect"), &estargz, &[]));
    let gets = whole_blob_gets(&proxy, &layers);
    assert!(
        gets.is_empty(),
        "eStargz layers were downloaded whole: {gets:?}"
    );
    assert!(
        snap.status().starts_with("served lazily 4\n"),
        "{}",
        snap.status()
    );
}

#[test]
fn a_registry_down_falls_back_and_a_corrupt_span_reads_as_eio() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&noise(3 << 20, 11));
    let l0 = lower.digest().to_string();
    FixtureImage::new("amd64", vec![lower, upper]).push(&reg.host, "snap/bad", "v1");
    let proxy = proxy::Proxy::start(&reg.host);
    let reference = format!("{}/snap/bad:v1", proxy.host);
    imgfs_ok(&work.path().join("pusher"), &["index", "push", &reference]);
    let snap = Snapshotter::start(&work.path().join("cache"), work.path());
    let mut client = snap.client();

    // A registry that is not there: containerd is given an ordinary snapshot, and the
    // reason is in the status file.
    let down = format!("127.0.0.1:{}/snap/bad:v1", free_port());
    let mounts = prepare(
        &mut client,
        "extract-1 down",
        "",
        &stargz_labels("down", &down, &l0),
    )
    .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    let status = snap.status();
    assert!(
        status.contains("fallbacks) 1") && status.contains(&down),
        "{status}"
    );

    // Served lazily, then every span the registry sends is damaged: the read fails with
    // EIO, never returns other bytes.
    let e = prepare(
        &mut client,
        "extract-2 ok",
        "",
        &stargz_labels("ok", &reference, &l0),
    )
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let mounts = prepare(&mut client, "container", "ok", &[]).unwrap();
    let lower_dir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(&mounts[0].source));
    proxy.corrupt_next_ranges(1000);
    let read = std::fs::read(lower_dir.join("bin/show"));
    proxy.corrupt_next_ranges(0);
    let e = read.expect_err("a damaged span must not be served");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        std::fs::read(lower_dir.join("bin/show")).unwrap(),
        noise(3 << 20, 11),
        "served once the registry sends the right bytes"
    );
}

#[test]
fn a_plain_pull_is_unpacked_by_containerd_counted_and_removed_with_the_image() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let (lower, upper) = two_layers(&show_binary(work.path()));
    FixtureImage::new("amd64", vec![lower, upper]).push(&reg.host, "snap/plain", "v1");
    let reference = format!("{}/snap/plain:v1", reg.host);
    let snap = Snapshotter::start(&work.path().join("cache"), work.path());
    let c = Containerd::start_with(&snap.proxy_plugin());

    // `ctr image pull` labels no image: containerd applies both layers on ordinary
    // snapshots, as with its overlayfs snapshotter, and each fallback is counted.
    c.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "imgfs",
        &reference,
    ]);
    assert_eq!(run_show(&c, &reference, "plain"), SHOWN);
    let status = snap.status();
    assert!(
        status.starts_with("served lazily 0\nunpacked by containerd (fallbacks) 2\n"),
        "{status}"
    );
    assert!(status.contains("names no target snapshot"), "{status}");
    let snapshots = snap.root.join("snapshots");
    // The two layers, and the container's until the garbage collector takes it.
    assert!(std::fs::read_dir(&snapshots).unwrap().count() >= 2);

    // Removing the image lets containerd's garbage collector remove the snapshots here.
    c.ctr_ok(&["image", "rm", "--sync", &reference]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&snapshots).unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "snapshots left: {:?}\n{}",
            std::fs::read_dir(&snapshots).unwrap().collect::<Vec<_>>(),
            String::from_utf8_lossy(&c.ctr(&["snapshots", "--snapshotter", "imgfs", "ls"]).stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_published_profile_is_fetched_once_the_image_s_layers_are_prepared() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let program = show_binary(work.path());
    let (lower, upper) = two_layers(&program);
    let (l0, l1) = (lower.digest().to_string(), upper.digest().to_string());
    FixtureImage::new("amd64", vec![lower, upper]).push(&reg.host, "snap/profile", "v1");
    let direct = format!("{}/snap/profile:v1", reg.host);
    // Machine A records the container's start (the program, and what it reads) and
    // publishes the profile with the indexes.
    let a = work.path().join("a");
    let recorded = work.path().join("start.profile");
    let m = common::mounted::Mounted::new(
        &a,
        &direct,
        &work.path().join("mnt"),
        &["--record-profile", recorded.to_str().unwrap()],
    );
    assert!(std::fs::read(m.dir.join("bin/show")).unwrap() == program);
    assert!(std::fs::read(m.dir.join("etc/top")).is_ok());
    m.unmount(&a);
    let profile = recorded.to_str().unwrap();
    imgfs_ok(&a, &["index", "push", "--profile", profile, &direct]);

    let proxy = proxy::Proxy::start(&reg.host);
    let reference = format!("{}/snap/profile:v1", proxy.host);
    let cache = work.path().join("cache");
    let snap = Snapshotter::start(&cache, work.path());
    let mut client = snap.client();
    assert!(
        prepare(
            &mut client,
            "extract-1 a",
            "",
            &stargz_labels("a", &reference, &l0)
        )
        .is_err()
    );
    assert!(
        prepare(
            &mut client,
            "extract-2 b",
            "a",
            &stargz_labels("b", &reference, &l1)
        )
        .is_err()
    );

    // Nothing has been read, yet the profile's spans arrive.
    let spans = cache.join("chunks/blake3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&spans).map_or(0, |d| d.count()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the profile was not replayed: {:?}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = proxy.log().len();
    let mounts = prepare(&mut client, "container", "b", &[]).unwrap();
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string();
    let lower = lowerdir.split(':').nth(1).unwrap();
    assert!(std::fs::read(Path::new(lower).join("bin/show")).unwrap() == program);
    assert_eq!(
        proxy.log()[before..].len(),
        0,
        "the program's spans were fetched again: {:?}",
        &proxy.log()[before..]
    );
}
