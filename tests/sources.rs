//! Resolving images from the three sources: a real registry, an OCI layout and a docker-archive,
//! with platform selection, raw bytes and the errors a user meets first.

mod common;

use common::*;
use imgfs::digest::Digest;

fn two_layer_image(arch: &str) -> FixtureImage {
    FixtureImage::docker(
        arch,
        vec![
            FixtureLayer::gzip(&[("etc/os-release", format!("ID=test-{arch}\n").as_bytes())]),
            FixtureLayer::gzip(&[("usr/bin/app", b"#!/bin/sh\necho hi\n")]),
        ],
    )
}

#[test]
fn inspect_reports_what_the_registry_holds_byte_for_byte() {
    let reg = registry();
    let img = two_layer_image("amd64");
    img.push(&reg.host, "test/inspect", "v1");
    let cache = tempfile::tempdir().unwrap();
    let image = format!("{}/test/inspect:v1", reg.host);

    let v = inspect_json(cache.path(), &image, &["--platform", "linux/amd64"]);
    assert_eq!(v["digest"], img.digest().to_string());
    assert_eq!(
        v["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(v["platform"], "linux/amd64");
    assert_eq!(v["config"]["digest"], Digest::of(&img.config).to_string());
    let want: Vec<String> = img.layers.iter().map(|l| l.digest().to_string()).collect();
    assert_eq!(layer_digests(&v), want);
    assert_eq!(v["layers"][0]["compression"], "gzip");
    assert_eq!(v["layers"][1]["diff_id"], img.layers[1].diff_id.to_string());
    assert_eq!(v["layers"][0]["size"], img.layers[0].blob.len());

    let raw = imgfs(cache.path(), &["inspect", "--raw", "manifest", &image]);
    assert_eq!(
        raw.stdout, img.manifest,
        "manifest bytes are printed as received"
    );
    let raw = imgfs(cache.path(), &["inspect", &image, "--raw", "config"]);
    assert_eq!(raw.stdout, img.config);

    let text = imgfs_ok(cache.path(), &["inspect", &image]);
    assert!(text.contains(&img.digest().to_string()), "{text}");
    assert!(text.contains("Layers:     2"), "{text}");

    // The same image pinned by digest, with the cache option after the command name.
    let pinned = format!("{}/test/inspect@{}", reg.host, img.digest());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgfs"))
        .args(["inspect", "--json", &pinned, "--cache-dir"])
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], img.digest().to_string());
}

#[test]
fn manifest_list_picks_the_requested_platform() {
    let reg = registry();
    let amd = two_layer_image("amd64");
    let arm = two_layer_image("arm64");
    let index = push_index(
        &reg.host,
        "test/multi",
        "latest",
        &[("amd64", None, &amd), ("arm64", Some("v8"), &arm)],
    );
    let cache = tempfile::tempdir().unwrap();
    let image = format!("{}/test/multi", reg.host);

    let v = inspect_json(cache.path(), &image, &["--platform", "linux/arm64"]);
    assert_eq!(v["digest"], arm.digest().to_string());
    assert_eq!(v["indexDigest"], index.to_string());
    assert_eq!(v["platform"], "linux/arm64");

    let v = inspect_json(cache.path(), &image, &["--platform", "linux/amd64"]);
    assert_eq!(v["digest"], amd.digest().to_string());

    let err = imgfs_err(
        cache.path(),
        &["inspect", &image, "--platform", "linux/s390x"],
    );
    assert!(err.contains("linux/s390x"), "{err}");
    assert!(err.contains("linux/amd64, linux/arm64/v8"), "{err}");

    // A single-platform image asked for another platform says so too.
    let single = format!("{}/test/multi@{}", reg.host, amd.digest());
    let err = imgfs_err(
        cache.path(),
        &["inspect", &single, "--platform", "linux/arm64"],
    );
    assert!(err.contains("available: linux/amd64"), "{err}");
}

#[test]
fn layout_and_docker_archive_give_the_registry_layer_digests() {
    let reg = registry();
    // Uncompressed layers: a docker-archive stores layers uncompressed, so only then are its
    // blob digests the registry's; with gzip the diff_ids must still agree.
    let plain = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::plain(&[("a/one", b"1")]),
            FixtureLayer::plain(&[("b/two", b"22")]),
        ],
    );
    plain.push(&reg.host, "test/local", "plain");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    plain.write_layout(&layout, "plain");
    let archive = dir.path().join("image.tar");
    let skopeo = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:plain", layout.display()))
        .arg(format!(
            "docker-archive:{}:test/local:plain",
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(
        skopeo.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&skopeo.stderr)
    );

    let cache = tempfile::tempdir().unwrap();
    let from_reg = inspect_json(cache.path(), &format!("{}/test/local:plain", reg.host), &[]);
    let from_layout = inspect_json(
        cache.path(),
        &format!("oci:{}:plain", layout.display()),
        &[],
    );
    let from_archive = inspect_json(
        cache.path(),
        &format!("docker-archive:{}", archive.display()),
        &[],
    );
    let by_tag = inspect_json(
        cache.path(),
        &format!("docker-archive:{}:test/local:plain", archive.display()),
        &[],
    );
    assert_eq!(layer_digests(&from_reg), layer_digests(&from_layout));
    assert_eq!(layer_digests(&from_reg), layer_digests(&from_archive));
    assert_eq!(from_archive["digest"], by_tag["digest"]);
    assert_eq!(from_reg["digest"], from_layout["digest"]);
    assert_eq!(from_archive["platform"], "linux/amd64");
    assert_eq!(from_archive["layers"][0]["compression"], "none");

    // Blobs read out of the archive verify and land in the cache.
    let out = imgfs_ok(
        cache.path(),
        &["fetch", &format!("docker-archive:{}", archive.display())],
    );
    for l in &plain.layers {
        let line = out
            .lines()
            .find(|x| x.starts_with(l.digest().as_str()))
            .unwrap();
        let path = line.split('\t').nth(1).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), l.blob);
    }

    // A gzip image: the archive recompresses nothing but stores tars; diff_ids agree.
    // (skopeo reads only OCI media types from a layout.)
    let gz = FixtureImage::new("amd64", two_layer_image("amd64").layers);
    gz.write_layout(&dir.path().join("gz"), "v1");
    let gz_archive = dir.path().join("gz.tar");
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:v1", dir.path().join("gz").display()))
        .arg(format!("docker-archive:{}", gz_archive.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let a = inspect_json(
        cache.path(),
        &format!("oci:{}", dir.path().join("gz").display()),
        &[],
    );
    let b = inspect_json(
        cache.path(),
        &format!("docker-archive:{}", gz_archive.display()),
        &[],
    );
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["diff_id"].to_string())
            .collect()
    };
    assert_eq!(ids(&a), ids(&b));
}

#[test]
fn fetch_verifies_caches_and_never_fetches_twice() {
    let reg = registry();
    let a = FixtureLayer::gzip(&[("x", b"layer a")]);
    let b = FixtureLayer::gzip(&[("y", b"layer b")]);
    let a_again = FixtureLayer::gzip(&[("x", b"layer a")]);
    let img = FixtureImage::new("amd64", vec![a, b, a_again]);
    img.push(&reg.host, "test/dup", "v1");
    let proxy = proxy::Proxy::start(&reg.host);
    let cache = tempfile::tempdir().unwrap();
    let image = format!("{}/test/dup:v1", proxy.host);

    let out = imgfs_ok(cache.path(), &["fetch", &image]);
    assert_eq!(out.lines().count(), 2, "two distinct layers: {out}");
    let blob_gets = |p: &proxy::Proxy| {
        p.log()
            .iter()
            .filter(|l| l.starts_with("GET") && l.contains("/blobs/"))
            .count()
    };
    // Config + two distinct layers, the repeated layer only once.
    assert_eq!(blob_gets(&proxy), 3, "{:?}", proxy.log());
    for l in &img.layers {
        let p = cache.path().join("blobs/sha256").join(l.digest().hex());
        assert_eq!(std::fs::read(p).unwrap(), l.blob);
    }
    imgfs_ok(cache.path(), &["fetch", &image]);
    assert_eq!(blob_gets(&proxy), 3, "cached blobs are not fetched again");
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_not_stored() {
    // Its own registry: this test corrupts storage.
    let reg = Registry::start(RegistryAuth::None);
    let layer = FixtureLayer::gzip(&[("file", &[7u8; 5000][..])]);
    let digest = layer.digest();
    let img = FixtureImage::new("amd64", vec![layer]);
    img.push(&reg.host, "test/bad", "v1");
    let data = reg.blob_data_path(&digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let cache = tempfile::tempdir().unwrap();
    let err = imgfs_err(
        cache.path(),
        &["fetch", &format!("{}/test/bad:v1", reg.host)],
    );
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(err.contains(digest.as_str()), "{err}");
    assert!(
        !cache
            .path()
            .join("blobs/sha256")
            .join(digest.hex())
            .exists()
    );
    let leftovers = std::fs::read_dir(cache.path().join("tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "no temporary file is left behind");
}

#[test]
fn clear_one_line_errors_for_what_users_get_wrong() {
    let reg = registry();
    two_layer_image("amd64").push(&reg.host, "test/errors", "v1");
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();

    let err = imgfs_err(c, &["inspect", &format!("{}/test/errors:nope", reg.host)]);
    assert!(
        err.contains("not found") && err.contains("\"nope\""),
        "{err}"
    );

    let err = imgfs_err(
        c,
        &["inspect", &format!("{}/test/no-such-repo:v1", reg.host)],
    );
    assert!(err.contains("not found"), "{err}");

    let err = imgfs_err(c, &["inspect", "no-such-host.invalid/a/b:1"]);
    assert!(
        err.contains("cannot reach registry no-such-host.invalid"),
        "{err}"
    );

    let closed = format!("127.0.0.1:{}/a:1", free_port());
    let err = imgfs_err(c, &["inspect", &closed]);
    assert!(err.contains("cannot reach registry 127.0.0.1"), "{err}");

    let err = imgfs_err(c, &["inspect", "library/UPPER"]);
    assert!(err.contains("lowercase"), "{err}");

    let err = imgfs_err(c, &["inspect", "alpine", "--platform", "linux"]);
    assert!(err.contains("OS/ARCH"), "{err}");

    // A layout whose manifest blob is well-named but not a manifest.
    let dir = tempfile::tempdir().unwrap();
    let img = two_layer_image("amd64");
    img.write_layout(dir.path(), "v1");
    let garbage = b"{\"schemaVersion\": 2, \"layers\": \"nope\"}".to_vec();
    let gd = Digest::of(&garbage);
    std::fs::write(dir.path().join("blobs/sha256").join(gd.hex()), &garbage).unwrap();
    let index = std::fs::read_to_string(dir.path().join("index.json"))
        .unwrap()
        .replace(img.digest().as_str(), gd.as_str());
    std::fs::write(dir.path().join("index.json"), index).unwrap();
    let err = imgfs_err(c, &["inspect", &format!("oci:{}:v1", dir.path().display())]);
    assert!(err.contains("malformed manifest"), "{err}");

    let err = imgfs_err(
        c,
        &["inspect", &format!("oci:{}:other", dir.path().display())],
    );
    assert!(
        err.contains("\"other\"") && err.contains("tags: v1"),
        "{err}"
    );

    let err = imgfs_err(c, &["inspect", "oci:/nonexistent/layout"]);
    assert!(err.contains("oci-layout"), "{err}");
}

#[test]
fn signed_schema1_manifests_apply_oldest_first_without_throwaway_layers() {
    let reg = registry();
    let base = FixtureLayer::gzip(&[("etc/base", b"base")]);
    let empty = FixtureLayer::gzip(&[]);
    let top = FixtureLayer::gzip(&[("etc/top", b"top")]);
    let push = |b: &[u8]| {
        rt().block_on(async {
            imgfs::registry::Client::new(Default::default())
                .unwrap()
                .push_blob(&reg.host, "test/legacy", bytes::Bytes::from(b.to_vec()))
                .await
                .unwrap()
        })
    };
    for l in [&base, &empty, &top] {
        push(&l.blob);
    }
    let layers = vec![
        (
            top.digest().to_string(),
            serde_json::json!({"id": "c3", "parent": "b2", "os": "linux", "architecture": "amd64"}),
        ),
        (
            empty.digest().to_string(),
            serde_json::json!({"id": "b2", "parent": "a1", "throwaway": true}),
        ),
        (base.digest().to_string(), serde_json::json!({"id": "a1"})),
    ];
    let body = common::schema1::manifest("test/legacy", "v1", &layers);
    let signed = common::schema1::sign(&body);
    let digest = rt().block_on(async {
        imgfs::registry::Client::new(Default::default())
            .unwrap()
            .push_manifest(
                &reg.host,
                "test/legacy",
                "v1",
                imgfs::manifest::media::SCHEMA1_SIGNED,
                bytes::Bytes::from(signed.clone()),
            )
            .await
            .unwrap()
    });
    assert_eq!(
        digest,
        Digest::of(body.as_bytes()),
        "the digest of a signed manifest is its payload's"
    );

    let cache = tempfile::tempdir().unwrap();
    let v = inspect_json(cache.path(), &format!("{}/test/legacy:v1", reg.host), &[]);
    assert_eq!(v["mediaType"], imgfs::manifest::media::SCHEMA1_SIGNED);
    assert_eq!(v["digest"], digest.to_string());
    assert_eq!(
        layer_digests(&v),
        vec![base.digest().to_string(), top.digest().to_string()]
    );
    let pinned = format!("{}/test/legacy@{digest}", reg.host);
    let raw = imgfs(cache.path(), &["inspect", "--raw", "manifest", &pinned]);
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let config = imgfs_ok(cache.path(), &["inspect", "--raw", "config", &pinned]);
    assert!(
        config.contains("\"c3\""),
        "schema 1's config is the newest v1Compatibility: {config}"
    );
    let out = imgfs_ok(cache.path(), &["fetch", &pinned]);
    assert_eq!(out.lines().count(), 2, "{out}");
}
