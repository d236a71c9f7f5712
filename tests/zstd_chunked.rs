//! zstd:chunked layers made by real producers (Debian's skopeo 1.9, `--dest-compress-format
//! zstd:chunked`, and stargz-snapshotter's `ctr-remote images convert --zstdchunked`): a mount from an empty cache fetches the TOCs and nothing else before reads,
//! the mounted tree equals the pulled one byte for byte (and the pull umoci's unpack), the current annotation keys work as
//! the legacy ones do, and a tampered TOC, a damaged chunk or a position past the blob's end
//! give a clear error or a fallback, never wrong bytes.

mod common;

use std::path::Path;
use std::process::Command;

use common::compare::assert_same_tree;
use common::containerd::Containerd;
use common::layers::Tar;
use common::mounted::Mounted;
use common::*;

const LEGACY: &str = "io.containers.zstd-chunked.";
const CURRENT: &str = "io.github.containers.zstd-chunked.";

/// The two layers' tars: text (small frames), `big` (several content-defined chunks for
/// noise), a file with a long run of zeros (a `zeros` chunk), links, and a whiteout above.
fn layer_tars(hostname: &[u8], big: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut holey = noise(3000, 7);
    holey.extend(std::iter::repeat_n(0u8, 300_000));
    holey.extend(noise(3000, 8));
    let lower = Tar::new()
        .dir("etc", 0o755)
        .file("etc/hostname", 0o644, hostname)
        .file("etc/empty", 0o644, b"")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/big", 0o755, big)
        .file("usr/bin/holey", 0o644, &holey)
        .symlink("usr/bin/link", "big")
        .hardlink("usr/bin/again", "usr/bin/big")
        .file("gone", 0o644, b"whited out above\n")
        .bytes();
    let upper = Tar::new()
        .file("etc/top", 0o600, &text(50_000, 9))
        .whiteout("gone")
        .bytes();
    (lower, upper)
}

/// Two layers as skopeo writes them in zstd:chunked (blob, annotations, diff_id of the tar).
fn skopeo_layers(work: &Path) -> Vec<FixtureLayer> {
    let (lower, upper) = layer_tars(b"chunked\n", &noise(700_000, 3));
    let plain = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::plain_tar(lower),
            FixtureLayer::plain_tar(upper),
        ],
    );
    let (src, dst) = (work.join("plain"), work.join("chunked"));
    plain.write_layout(&src, "v1");
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "-q",
            "--dest-compress-format",
            "zstd:chunked",
        ])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:v1", dst.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| std::fs::read(dst.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    (manifest["layers"].as_array().unwrap().iter())
        .zip(&plain.layers)
        .map(|(l, p)| {
            let annotations = l["annotations"].as_object().unwrap().clone();
            assert!(
                annotations.keys().any(|k| k.starts_with(LEGACY)),
                "{annotations:?}"
            );
            FixtureLayer {
                blob: blob(l["digest"].as_str().unwrap()),
                media_type: imgfs::manifest::media::OCI_LAYER_ZSTD,
                diff_id: p.diff_id.clone(),
                annotations,
            }
        })
        .collect()
}

/// `layers` with their annotation keys changed by `f`.
fn renamed(
    layers: &[FixtureLayer],
    f: impl Fn(&str, &str) -> Option<(String, String)>,
) -> Vec<FixtureLayer> {
    layers
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l.annotations = (l.annotations.iter())
                .filter_map(|(k, v)| f(k, v.as_str().unwrap()).map(|(k, v)| (k, v.into())))
                .collect();
            l
        })
        .collect()
}

#[test]
fn a_mount_reads_only_the_tocs_then_serves_the_pulled_tree() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let layers = skopeo_layers(work.path());
    let total: usize = layers.iter().map(|l| l.blob.len()).sum();
    let current = renamed(&layers, |k, v| {
        Some((k.replace(LEGACY, CURRENT), v.to_string()))
    });
    for (name, layers) in [("legacy", layers.clone()), ("current", current)] {
        FixtureImage::new("amd64", layers.clone()).push(&reg.host, &format!("zc/{name}"), "v1");
        let proxy = proxy::Proxy::start(&reg.host);
        let image = format!("{}/zc/{name}:v1", proxy.host);
        let cache = work.path().join(format!("cache-{name}"));
        let m = Mounted::new(
            &cache,
            &image,
            &work.path().join(format!("mnt-{name}")),
            &[],
        );
        let before_reads = proxy.blob_bytes();
        assert!(
            before_reads < total as u64 / 10,
            "{name}: {before_reads} of {total} bytes before any read"
        );
        let digests: Vec<String> = layers.iter().map(|l| l.digest().to_string()).collect();
        let whole: Vec<String> = (proxy.log().into_iter())
            .filter(|l| digests.iter().any(|d| l.contains(d.as_str())))
            .filter(|l| !l.to_lowercase().contains("range"))
            .collect();
        assert!(
            whole.is_empty(),
            "{name}: whole layer blobs fetched: {whole:?}"
        );
        let pulled = work.path().join(format!("pulled-{name}"));
        imgfs_ok(
            &work.path().join("pull-cache"),
            &["pull", "-q", &image, pulled.to_str().unwrap()],
        );
        assert_same_tree(&m.dir, &pulled, name);
        if name == "legacy" {
            // The pull equals umoci's unpack of the same layers uncompressed (Debian's umoci
            // reads no zstd).
            let bundle = work.path().join("bundle");
            let ok = Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:v1", work.path().join("plain").display()))
                .arg(&bundle)
                .status()
                .unwrap();
            assert!(ok.success(), "umoci unpack");
            assert_same_tree(&pulled, &bundle.join("rootfs"), "pull vs umoci");
        }
        assert!(!m.dir.join("gone").exists());
        m.unmount(&cache);
    }
}

#[test]
fn bad_tocs_and_chunks_are_refused_or_fall_back_never_wrong_bytes() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    let layers = skopeo_layers(work.path());
    let proxy = proxy::Proxy::start(&reg.host);

    // A checksum that is not the TOC's: refused, naming it.
    let zeros = format!("sha256:{}", "0".repeat(64));
    let tampered = renamed(&layers, |k, v| {
        Some((
            k.to_string(),
            if k.ends_with("manifest-checksum") {
                zeros.clone()
            } else {
                v.to_string()
            },
        ))
    });
    FixtureImage::new("amd64", tampered).push(&reg.host, "zc/tampered", "v1");
    let err = imgfs_err(
        &work.path().join("c1"),
        &[
            "cat",
            &format!("{}/zc/tampered:v1", reg.host),
            "etc/hostname",
        ],
    );
    assert!(
        err.contains("zstd:chunked TOC") && err.contains("digest mismatch"),
        "{err}"
    );

    // A position past the blob's end: the layer is streamed instead, with the reason logged.
    let past = renamed(&layers, |k, v| {
        Some((
            k.to_string(),
            if k.ends_with("manifest-position") {
                "999999999:10:10:1".into()
            } else {
                v.to_string()
            },
        ))
    });
    FixtureImage::new("amd64", past).push(&reg.host, "zc/past", "v1");
    let out = imgfs(
        &work.path().join("c2"),
        &[
            "-v",
            "cat",
            &format!("{}/zc/past:v1", reg.host),
            "etc/hostname",
        ],
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, b"chunked\n");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("not read as zstd:chunked") && log.contains("past the blob"),
        "{log}"
    );

    // Chunks damaged in transit: EIO, never other bytes; right once the bytes are.
    FixtureImage::new("amd64", layers).push(&reg.host, "zc/damaged", "v1");
    let image = format!("{}/zc/damaged:v1", proxy.host);
    let cache = work.path().join("c3");
    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), &[]);
    proxy.corrupt_next_ranges(1000);
    let err = std::fs::read(m.dir.join("usr/bin/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    proxy.corrupt_next_ranges(0);
    assert!(std::fs::read(m.dir.join("usr/bin/big")).unwrap() == noise(700_000, 3));
    m.unmount(&cache);
}

/// ctr-remote writes zstd:chunked its own way (several files may share a frame, no
/// `endOffset`, the stargz TOC annotation beside the legacy keys): the same promise holds.
#[test]
fn layers_converted_by_ctr_remote_mount_from_their_tocs() {
    let reg = registry();
    let work = tempfile::tempdir().unwrap();
    // A file over ctr-remote's 4 MiB chunk size, so that it has several chunks.
    let (lower, upper) = layer_tars(b"converted\n", &noise(5 << 20, 3));
    FixtureImage::new(
        "amd64",
        vec![FixtureLayer::from_tar(lower), FixtureLayer::from_tar(upper)],
    )
    .push(&reg.host, "zc/ctr", "gzip");
    let src = format!("{}/zc/ctr:gzip", reg.host);
    let dst = format!("{}/zc/ctr:zchunked", reg.host);
    let ctd = Containerd::start();
    ctd.ctr_ok(&["images", "pull", "--plain-http", &src]);
    ctd.ctr_ok(&["images", "convert", "--zstdchunked", "--oci", &src, &dst]);
    ctd.ctr_ok(&["images", "push", "--plain-http", &dst, &dst]);

    let v = inspect_json(&work.path().join("c0"), &dst, &[]);
    let layers = v["layers"].as_array().unwrap();
    let chunked = (layers.iter())
        .filter(|l| l["annotations"][format!("{LEGACY}manifest-position")].is_string())
        .count();
    assert_eq!(chunked, 2, "{v:#}");

    let proxy = proxy::Proxy::start(&reg.host);
    let image = format!("{}/zc/ctr:zchunked", proxy.host);
    let cache = work.path().join("c1");
    let m = Mounted::new(
        &cache,
        &image,
        &work.path().join("mnt"),
        &["--prefetch", "none"],
    );
    assert_eq!(
        count_files(&cache.join("indexes/sha256")),
        0,
        "read through the TOCs"
    );
    let whole_gets = (proxy.log().iter())
        .filter(|l| l.contains("/blobs/") && !l.to_ascii_lowercase().contains("range:"))
        .count();
    assert_eq!(whole_gets, 1, "only the config: {:?}", proxy.log());
    let pulled = work.path().join("pulled");
    imgfs_ok(
        &work.path().join("c2"),
        &["pull", "-q", &src, pulled.to_str().unwrap()],
    );
    assert_same_tree(
        &m.dir,
        &pulled,
        "mount of ctr-remote's zstd:chunked vs pull of the original",
    );
    let reference = umoci_unpack(&src, &work.path().join("umoci"));
    assert_same_tree(&pulled, &reference, "pull vs umoci unpack of the original");
    assert!(!m.dir.join("gone").exists());
    m.unmount(&cache);
}
