//! Index once, mount anywhere: `imgfs index push` publishes layer indexes as an OCI artifact
//! referring to the image (through the `sha256-<hex>` tag, as Debian's docker-registry has no
//! referrers API), and a machine with a fresh cache mounts from them without streaming a
//! layer. Tampered artifacts are refused and the layer is indexed locally; shared layers
//! share their index blob; mirrors are tried first and fall back to the registry.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::compare::assert_same_tree;
use common::layers::Tar;
use common::mounted::Mounted;
use common::proxy::Proxy;
use common::*;
use imgfs::digest::Digest;
use imgfs::manifest::media;
use imgfs::registry::{Client, ClientOptions};

const MIB: usize = 1 << 20;

/// Three layers (gzip over several spans, zstd, plain), pushed to the shared registry.
fn image(base_seed: u64) -> (FixtureImage, Vec<(String, Vec<u8>)>) {
    let files = vec![
        ("big/noise.bin".to_string(), noise(9 * MIB, base_seed)),
        (
            "mid/small.txt".to_string(),
            b"small between big ones\n".to_vec(),
        ),
        ("z/zfile".to_string(), text(200_000, base_seed + 1)),
        ("p/plain.txt".to_string(), b"in the plain layer".to_vec()),
    ];
    let l1 = Tar::new()
        .dir("big", 0o755)
        .file(&files[0].0, 0o644, &files[0].1)
        .dir("mid", 0o755)
        .file(&files[1].0, 0o600, &files[1].1)
        .symlink("mid/link", "small.txt")
        .bytes();
    let l2 = Tar::new()
        .dir("z", 0o755)
        .file(&files[2].0, 0o644, &files[2].1)
        .whiteout("mid/link")
        .bytes();
    let l3 = Tar::new()
        .dir("p", 0o755)
        .file(&files[3].0, 0o644, &files[3].1)
        .bytes();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(l1),
            FixtureLayer::zstd_from_tar(l2),
            FixtureLayer::plain_tar(l3),
        ],
    );
    (img, files)
}

/// The index of `layer` that `cache` built itself.
fn index_file(cache: &Path, layer: &Digest) -> Vec<u8> {
    std::fs::read(cache.join("indexes/sha256").join(layer.hex())).unwrap()
}

/// The index of `layer` that `cache` got from the registry.
fn published_file(cache: &Path, layer: &Digest) -> Option<Vec<u8>> {
    std::fs::read(
        cache
            .join("indexes/sha256")
            .join(format!("{}.published", layer.hex())),
    )
    .ok()
}

/// Layer blobs (not index blobs) the proxy was asked for.
fn layer_gets(proxy: &Proxy, img: &FixtureImage) -> Vec<String> {
    proxy
        .log()
        .into_iter()
        .filter(|l| {
            l.starts_with("GET")
                && img
                    .layers
                    .iter()
                    .any(|layer| l.contains(layer.digest().hex()))
        })
        .collect()
}

#[test]
fn a_fresh_cache_mounts_from_the_published_index_without_streaming_a_layer() {
    let reg = registry();
    let (img, files) = image(10);
    img.push(&reg.host, "remote/first", "v1");
    let direct = format!("{}/remote/first:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));

    // The spans a view uses when it indexes a layer itself: B's own indexes are compared
    // with these below.
    let out = imgfs_ok(&a, &["index", "push", "--span-size", "4MiB", &direct]);
    assert!(out.contains("pushed index artifact sha256:"), "{out}");
    assert!(out.contains("3 index(es)"), "{out}");
    assert!(
        out.contains(&format!("sha256-{}", img.digest().hex())),
        "{out}"
    );
    // Pushing again changes nothing: same artifact, already listed.
    let again = imgfs_ok(&a, &["index", "push", "--span-size", "4MiB", &direct]);
    let artifact = |s: &str| s.split_whitespace().nth(3).unwrap().to_string();
    assert_eq!(artifact(&out), artifact(&again));
    assert!(!again.contains("listed under tag"), "{again}");

    // Machine B: through a counting proxy, nothing cached.
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/remote/first:v1", proxy.host);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&b, &image, &mnt, &["--prefetch", "none"]);
    assert!(
        layer_gets(&proxy, &img).is_empty(),
        "layers fetched before any read: {:?}",
        proxy.log()
    );
    let compressed: usize = img.layers.iter().map(|l| l.blob.len()).sum();
    assert!(
        (proxy.blob_bytes() as usize) < compressed / 20,
        "{} bytes served for a {compressed}-byte image",
        proxy.blob_bytes()
    );
    // What B cached is what A published, kept apart from indexes built here: A's index, or
    // for the gzip layer its slim form (windows apart, named beside it, left in the registry
    // until a read needs one).
    for l in &img.layers {
        let built = index_file(&a, &l.digest());
        let full = imgfs::index::codec::decode(&l.digest(), &built).unwrap();
        let published = match imgfs::index::windows::slim(&full) {
            Some((slim, windows)) => {
                imgfs::index::codec::encode_slim(&l.digest(), &slim, &Digest::of(&windows))
            }
            None => built.clone(),
        };
        assert!(published.len() < built.len() || published == built);
        assert_eq!(published_file(&b, &l.digest()), Some(published));
        assert!(!b.join("indexes/sha256").join(l.digest().hex()).exists());
    }
    let gz = img.layers[0].digest();
    assert!(
        b.join(format!("indexes/sha256/{}.windows", gz.hex()))
            .is_file()
    );
    // A small file costs one range of one layer.
    assert_eq!(
        std::fs::read(mnt.join("mid/small.txt")).unwrap(),
        files[1].1
    );
    let gets = layer_gets(&proxy, &img);
    assert!(
        gets.len() == 1 && gets[0].to_ascii_lowercase().contains("range:"),
        "{gets:?}"
    );
    let pulled = work.path().join("pulled");
    imgfs_ok(&a, &["pull", "-q", &direct, pulled.to_str().unwrap()]);
    assert_same_tree(&mnt, &pulled, "mount from a published index vs pull");
    m.unmount(&b);

    // --no-remote-index means indexes built here, even with published ones cached.
    proxy.reset_counts();
    imgfs_ok(&b, &["ls", "--no-remote-index", &image, "/"]);
    assert_eq!(layer_gets(&proxy, &img).len(), 3, "{:?}", proxy.log());
    // And `index push` from B publishes what B built, not what it was given.
    for l in &img.layers {
        assert_eq!(index_file(&b, &l.digest()), index_file(&a, &l.digest()));
    }
}

/// Publish an artifact listing one index blob for `layer` (whatever its bytes), as the only
/// entry of the image's referrers tag.
fn publish(host: &str, repo: &str, img: &FixtureImage, layer: &Digest, blob: Vec<u8>) {
    rt().block_on(async {
        let c = Client::new(ClientOptions::default()).unwrap();
        let size = blob.len() as u64;
        let blob = c.push_blob(host, repo, Bytes::from(blob)).await.unwrap();
        c.push_blob(host, repo, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let subject = imgfs::manifest::Descriptor {
            media_type: img.manifest_media_type.to_string(),
            digest: img.digest(),
            size: img.manifest.len() as u64,
            urls: vec![],
            annotations: Default::default(),
            platform: None,
            size_unknown: false,
        };
        let manifest = imgfs::artifact::build_manifest(&subject, &[(layer.clone(), blob, size)]);
        let (artifact, _) = c
            .push_referrer(
                host,
                repo,
                media::OCI_MANIFEST,
                Bytes::from(manifest.clone()),
                &img.digest(),
            )
            .await
            .unwrap();
        let list = serde_json::json!({
            "schemaVersion": 2, "mediaType": media::OCI_INDEX,
            "manifests": [{
                "mediaType": media::OCI_MANIFEST, "digest": artifact.to_string(),
                "size": manifest.len(), "artifactType": imgfs::artifact::ARTIFACT_TYPE,
            }],
        });
        c.push_manifest(
            host,
            repo,
            &imgfs::artifact::fallback_tag(&img.digest()),
            media::OCI_INDEX,
            Bytes::from(serde_json::to_vec(&list).unwrap()),
        )
        .await
        .unwrap();
    });
}

#[test]
fn tampered_index_artifacts_are_refused_and_the_layer_is_indexed_here() {
    let reg = registry();
    let (img, files) = image(20);
    let repo = "remote/tampered";
    img.push(&reg.host, repo, "v1");
    let direct = format!("{}/{repo}:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good");
    // The spans a view uses when it indexes a layer itself, so that the two can be compared.
    imgfs_ok(&good, &["index", "build", "--span-size", "4MiB", &direct]);
    let (gz, zst) = (img.layers[0].digest(), img.layers[1].digest());
    let gz_index = index_file(&good, &gz);
    let mut truncated = gz_index.clone();
    truncated.truncate(gz_index.len() - 100);
    // Well-formed, but its last seek point lies past the end of the layer.
    let mut past_end = imgfs::index::codec::decode(&gz, &gz_index).unwrap();
    past_end
        .seek
        .as_mut()
        .unwrap()
        .checkpoints
        .last_mut()
        .unwrap()
        .in_offset = img.layers[0].blob.len() as u64 + 1000;
    let past_end = imgfs::index::codec::encode(&gz, &past_end);

    for (i, (what, layer, blob, says)) in [
        // The zstd layer's index offered as the gzip layer's.
        (
            "wrong layer",
            &gz,
            index_file(&good, &zst),
            "describes layer",
        ),
        ("truncated", &gz, truncated, "checksum"),
        ("garbage", &gz, b"not an index at all".to_vec(), "bad magic"),
        (
            "seek point past the end",
            &gz,
            past_end,
            "seek point at byte",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        publish(&reg.host, repo, &img, layer, blob);
        let cache = work.path().join(format!("fresh{i}"));
        let out = imgfs(&cache, &["cat", &direct, "mid/small.txt"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert_eq!(out.stdout, files[1].1, "{what}");
        assert!(
            stderr.contains("refused") && stderr.contains(says) && stderr.contains(gz.as_str()),
            "{what}: {stderr}"
        );
        // Indexed here instead, exactly as the good machine did.
        assert_eq!(index_file(&cache, &gz), gz_index, "{what}");
    }

    // A mount over the last (garbage) artifact works and equals the pull.
    let cache = work.path().join("mount");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mounted::new(&cache, &direct, &mnt, &[]);
    let pulled = work.path().join("pulled");
    imgfs_ok(&good, &["pull", "-q", &direct, pulled.to_str().unwrap()]);
    assert_same_tree(&mnt, &pulled, "mount after refusing a garbage index");
    m.unmount(&cache);
}

#[test]
fn images_sharing_a_base_layer_share_its_index_blob() {
    let reg = registry();
    let base = FixtureLayer::gzip(&[("etc/base", b"shared base".as_slice())]);
    let one = FixtureImage::new(
        "amd64",
        vec![
            base.clone(),
            FixtureLayer::gzip(&[("one", b"1".as_slice())]),
        ],
    );
    let two = FixtureImage::new(
        "amd64",
        vec![
            base.clone(),
            FixtureLayer::gzip(&[("two", b"2".as_slice())]),
        ],
    );
    let repo = "remote/shared";
    one.push(&reg.host, repo, "one");
    two.push(&reg.host, repo, "two");
    let proxy = Proxy::start(&reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let uploads = || -> Vec<String> {
        proxy
            .log()
            .into_iter()
            .filter(|l| l.starts_with("PUT") && l.contains("digest="))
            .collect()
    };
    imgfs_ok(
        &cache,
        &["index", "push", &format!("{}/{repo}:one", proxy.host)],
    );
    let base_index = Digest::of(&index_file(&cache, &base.digest()));
    let first = uploads();
    assert!(
        first.iter().any(|l| l.contains(base_index.hex())),
        "the first push uploads the base layer's index: {first:?}"
    );
    proxy.reset_counts();
    imgfs_ok(
        &cache,
        &["index", "push", &format!("{}/{repo}:two", proxy.host)],
    );
    let second = uploads();
    assert!(
        second.len() == 1 && !second[0].contains(base_index.hex()),
        "the second push uploads only its own layer's index: {second:?}"
    );
    // Both artifacts name the same blob for the base layer.
    let artifact_blobs = |img: &FixtureImage| -> Vec<String> {
        rt().block_on(async {
            let c = Client::new(ClientOptions::default()).unwrap();
            let tag = imgfs::artifact::fallback_tag(&img.digest());
            let list = c.get_manifest(&reg.host, repo, &tag).await.unwrap();
            let list: serde_json::Value = serde_json::from_slice(&list.bytes).unwrap();
            let art = list["manifests"][0]["digest"].as_str().unwrap().to_string();
            let m = c.get_manifest(&reg.host, repo, &art).await.unwrap();
            let m: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap();
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string())
                .collect()
        })
    };
    let (a, b) = (artifact_blobs(&one), artifact_blobs(&two));
    assert_eq!(a[0], base_index.to_string());
    assert_eq!(b[0], base_index.to_string());
    assert_ne!(a[1], b[1]);
}

#[test]
fn a_mirror_is_asked_first_and_a_dead_one_is_passed_over() {
    let reg = registry();
    let (img, files) = image(30);
    let repo = "remote/mirrored";
    img.push(&reg.host, repo, "v1");
    // The mirror: a second real registry holding the same image.
    let mirror = common::Registry::start(common::RegistryAuth::None);
    img.push(&mirror.host, repo, "v1");
    let origin = Proxy::start(&reg.host);
    let image = format!("{}/{repo}:v1", origin.host);
    let work = tempfile::tempdir().unwrap();

    let cache = work.path().join("mirrored");
    let out = imgfs(
        &cache,
        &["--mirror", &mirror.host, "cat", &image, "z/zfile"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == files[2].1);
    assert!(
        origin.log().iter().all(|l| !l.contains("/blobs/")),
        "blobs came from the registry, not the mirror: {:?}",
        origin.log()
    );

    // The same through the config file, with a dead mirror listed first.
    let dead = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[mirrors]\n\"{}\" = [\"{dead}\"]\n", origin.host),
    )
    .unwrap();
    origin.reset_counts();
    let cache = work.path().join("dead");
    let out = imgfs_env(
        &cache,
        &["cat", &image, "z/zfile"],
        &[("IMGFS_CONFIG", config.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == files[2].1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Passed over once for the command, not asked again for every blob.
    assert_eq!(
        stderr.matches(&format!("mirror {dead}")).count(),
        1,
        "{stderr}"
    );
    assert!(
        origin.log().iter().any(|l| l.contains("/blobs/")),
        "the registry served the blobs"
    );

    // A mirror that sends wrong bytes (its stored copy of a layer is damaged) is dropped
    // and the registry asked.
    let damaged = mirror.blob_data_path(&img.layers[1].digest());
    let mut bytes = std::fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&damaged, &bytes).unwrap();
    let cache = work.path().join("wrong-bytes");
    let out = imgfs(
        &cache,
        &["--mirror", &mirror.host, "cat", &image, "z/zfile"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out.stdout == files[2].1);
    assert!(stderr.contains("wrong bytes"), "{stderr}");
    // The same for a pull, which extracts while it downloads: the layer is redone.
    let cache = work.path().join("wrong-bytes-pull");
    let target = work.path().join("pulled");
    let out = imgfs(
        &cache,
        &[
            "--mirror",
            &mirror.host,
            "pull",
            "-q",
            &image,
            target.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("wrong bytes"), "{stderr}");
    assert!(std::fs::read(target.join("z/zfile")).unwrap() == files[2].1);

    // A config file that does not parse is an error, not silently ignored.
    std::fs::write(&config, "mirrors = 3").unwrap();
    let out = imgfs_env(
        &cache,
        &["ls", &image],
        &[("IMGFS_CONFIG", config.to_str().unwrap())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("config"),
        "{stderr}"
    );
}

#[test]
fn a_window_that_comes_back_wrong_is_never_used() {
    let reg = registry();
    let (img, files) = image(40);
    img.push(&reg.host, "remote/windows", "v1");
    let direct = format!("{}/remote/windows:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let out = imgfs_ok(&work.path().join("a"), &["index", "push", &direct]);
    assert!(out.contains("windows apart"), "{out}");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/remote/windows:v1", proxy.host);
    let b = work.path().join("b");
    // `ls` takes the published (slim) index; the windows blob is named beside it.
    imgfs_ok(&b, &["ls", &image, "/"]);
    let gz = img.layers[0].digest();
    let named =
        std::fs::read_to_string(b.join(format!("indexes/sha256/{}.windows", gz.hex()))).unwrap();
    let windows = Digest::parse(named.split_whitespace().next().unwrap()).unwrap();

    // mid/small.txt lies past the 9 MiB of noise: its span needs a window.
    proxy.corrupt_next_ranges_of(windows.hex(), 1000);
    let out = imgfs(&b, &["cat", &image, "mid/small.txt"]);
    assert!(
        !out.status.success(),
        "cat answered with a wrong window: {:?}",
        out.stdout
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not match the index"), "{err}");
    assert!(
        proxy.log().iter().any(|l| l.contains(windows.hex())),
        "the window was asked for by range: {:?}",
        proxy.log()
    );
    proxy.corrupt_next_ranges(0);
    assert_eq!(
        imgfs(&b, &["cat", &image, "mid/small.txt"]).stdout,
        files[1].1
    );

    // A registry that ignores ranges: the layer and the windows blob come whole.
    proxy.ignore_range(true);
    let c = work.path().join("c");
    assert_eq!(
        imgfs(&c, &["cat", &image, "mid/small.txt"]).stdout,
        files[1].1
    );

    // The blob is here now and the windows are not: when a window cannot be had, the read
    // decompresses the local blob from an earlier seek point instead — slower, still right.
    proxy.ignore_range(false);
    assert!(c.join("blobs/sha256").join(gz.hex()).is_file());
    std::fs::remove_dir_all(c.join("chunks")).unwrap();
    proxy.corrupt_next_ranges_of(windows.hex(), 1000);
    proxy.reset_counts();
    let out = imgfs(&c, &["cat", &image, "mid/small.txt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, files[1].1);
    assert!(
        proxy.log().iter().any(|l| l.contains(windows.hex())),
        "the window was asked for first"
    );
}
