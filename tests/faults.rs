//! A registry reached through a misbehaving proxy: cut downloads resume with `Range` and still
//! verify, a registry that ignores `Range` is handled, and 5xx answers are retried with backoff.
//! A registry that stalls (never answers, trickles manifests or blobs) fails the command
//! within a bound, naming the host and what stalled; bodies that are not the blob (an HTML
//! page, a blob shorter than its descriptor) are named for what they are.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy, Stall, Target};
use common::*;

/// Stall rules short enough for tests: no byte for 1 s, or under 200 bytes/s over 1.5 s.
const FAST_STALLS: &[(&str, &str)] = &[
    ("IMGFS_STALL_TIMEOUT", "1"),
    ("IMGFS_LOW_SPEED_LIMIT", "200"),
    ("IMGFS_LOW_SPEED_TIME", "1.5"),
];

/// Run imgfs with [`FAST_STALLS`]; it must fail with one line. Returns the line and how long
/// the command took.
fn fails_with_fast_stalls(cache: &Path, args: &[&str]) -> (String, Duration) {
    let t = Instant::now();
    let out = imgfs_env(cache, args, FAST_STALLS);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "imgfs {args:?} should have failed");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    (err, took)
}

/// Only verified blobs in the cache, no temporary file, and no blob `hex`.
fn assert_nothing_kept(cache: &Path, hex: &str) {
    assert_cache_names_verify(cache);
    assert!(!cache.join("blobs/sha256").join(hex).exists());
    let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .into_iter()
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
}

fn big_image(repo: &str, seed: u64) -> (FixtureImage, String) {
    let reg = registry();
    let data = noise(400_000, seed);
    let img = FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("big.bin", &data)])]);
    img.push(&reg.host, repo, "v1");
    (img, format!("{repo}:v1"))
}

fn blob_requests(p: &proxy::Proxy) -> Vec<String> {
    p.log()
        .into_iter()
        .filter(|l| l.starts_with("GET") && l.contains("/blobs/"))
        .collect()
}

#[test]
fn a_cut_download_resumes_with_range_and_verifies() {
    let (img, name) = big_image("test/cut", 1);
    let proxy = proxy::Proxy::start(&registry().host);
    proxy.cut_next_blob_gets(2, 100_000);
    let cache = tempfile::tempdir().unwrap();
    imgfs_ok(cache.path(), &["fetch", &format!("{}/{name}", proxy.host)]);

    let stored = std::fs::read(
        cache
            .path()
            .join("blobs/sha256")
            .join(img.layers[0].digest().hex()),
    )
    .unwrap();
    assert_eq!(stored, img.layers[0].blob);
    let log = blob_requests(&proxy);
    assert!(
        log.iter().any(|l| l.contains("bytes=100000-")),
        "resumed from the cut: {log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("bytes=200000-")),
        "and again from the second cut: {log:?}"
    );
}

#[test]
fn a_registry_that_ignores_range_is_downloaded_again_from_the_start() {
    let (img, name) = big_image("test/norange", 2);
    let proxy = proxy::Proxy::start(&registry().host);
    proxy.ignore_range(true);
    proxy.cut_next_blob_gets(1, 150_000);
    let cache = tempfile::tempdir().unwrap();
    imgfs_ok(cache.path(), &["fetch", &format!("{}/{name}", proxy.host)]);
    let stored = std::fs::read(
        cache
            .path()
            .join("blobs/sha256")
            .join(img.layers[0].digest().hex()),
    )
    .unwrap();
    assert_eq!(stored, img.layers[0].blob);
}

#[test]
fn downloads_cut_too_often_fail_clearly_and_store_nothing() {
    let (img, name) = big_image("test/flaky", 3);
    let proxy = proxy::Proxy::start(&registry().host);
    proxy.cut_next_blob_gets(100, 1_000);
    let cache = tempfile::tempdir().unwrap();
    let err = imgfs_err(cache.path(), &["fetch", &format!("{}/{name}", proxy.host)]);
    assert!(err.contains("interrupted"), "{err}");
    assert!(err.contains(img.layers[0].digest().as_str()), "{err}");
    assert!(
        !cache
            .path()
            .join("blobs/sha256")
            .join(img.layers[0].digest().hex())
            .exists()
    );
}

#[test]
fn server_errors_are_retried_then_reported() {
    let (_img, name) = big_image("test/retry", 4);
    let proxy = proxy::Proxy::start(&registry().host);
    let cache = tempfile::tempdir().unwrap();
    let image = format!("{}/{name}", proxy.host);

    proxy.fail_next(2, 503);
    imgfs_ok(cache.path(), &["inspect", &image]);
    proxy.fail_next(1, 429);
    imgfs_ok(cache.path(), &["fetch", &image]);

    proxy.fail_next(50, 502);
    let err = imgfs_err(cache.path(), &["inspect", &image]);
    assert!(err.contains("502") && err.contains("5 attempts"), "{err}");
}

#[test]
fn a_registry_that_accepts_and_never_answers_fails_within_a_bound() {
    let (_img, name) = big_image("test/silent", 5);
    let proxy = Proxy::start(&registry().host);
    proxy.stall_next(Target::Path("/v2/".into()), 1000, Stall::Silent);
    let cache = tempfile::tempdir().unwrap();
    let (err, took) = fails_with_fast_stalls(
        cache.path(),
        &["inspect", &format!("{}/{name}", proxy.host)],
    );
    // Three attempts of 1 s, backoff between them; the old read timeout waited 5 x 60 s.
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    assert!(
        err.contains(&format!("registry {}: manifest", proxy.host))
            && err.contains("stalled: no response for 1 s (3 attempts)"),
        "{err}"
    );
    assert_eq!(proxy.log().len(), 3, "three attempts: {:?}", proxy.log());
}

#[test]
fn a_trickled_manifest_breaks_the_low_speed_rule() {
    let (_img, name) = big_image("test/slow-manifest", 6);
    let proxy = Proxy::start(&registry().host);
    // A byte every 0.3 s never leaves 1 s without data; 5 bytes in 1.5 s is too slow.
    proxy.stall_next(
        Target::Path("/manifests/".into()),
        1000,
        Stall::Trickle(Duration::from_millis(300)),
    );
    let cache = tempfile::tempdir().unwrap();
    let (err, took) = fails_with_fast_stalls(
        cache.path(),
        &["inspect", &format!("{}/{name}", proxy.host)],
    );
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.contains(&format!("registry {}: manifest", proxy.host))
            && err.contains("bytes in 1.5 s, under the minimum of 200 bytes/s")
            && err.contains("(3 attempts)"),
        "{err}"
    );
}

#[test]
fn a_trickled_blob_is_resumed_then_fails_clearly_and_leaves_nothing() {
    let (img, name) = big_image("test/slow-blob", 7);
    let layer = img.layers[0].digest();
    let proxy = Proxy::start(&registry().host);
    let image = format!("{}/{name}", proxy.host);
    let cache = tempfile::tempdir().unwrap();
    // A byte every 1.5 s: the stall rule (1 s) ends each attempt.
    proxy.stall_next(
        Target::Path(layer.hex().to_string()),
        1000,
        Stall::Trickle(Duration::from_millis(1500)),
    );
    let (err, took) = fails_with_fast_stalls(cache.path(), &["fetch", &image]);
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.contains(&format!(
            "registry {}: blob {layer} stalled: no data for 1 s (3 attempts)",
            proxy.host
        )),
        "{err}"
    );
    // Stalls are retried like cuts: the second attempt resumed where the first stopped.
    let gets = blob_requests(&proxy);
    let tries: Vec<_> = gets.iter().filter(|l| l.contains(layer.hex())).collect();
    assert_eq!(tries.len(), 3, "{gets:?}");
    assert!(tries[1].contains("bytes=1-"), "{gets:?}");
    assert_nothing_kept(cache.path(), layer.hex());
}

#[test]
fn an_html_page_for_a_blob_is_named_not_called_an_interruption() {
    let (img, name) = big_image("test/portal", 8);
    let layer = img.layers[0].digest();
    let proxy = Proxy::start(&registry().host);
    let image = format!("{}/{name}", proxy.host);
    let cache = tempfile::tempdir().unwrap();
    // The config is fetched (and kept) by inspect; the page then stands for the layer.
    imgfs_ok(cache.path(), &["inspect", &image]);
    proxy.reset_counts();
    proxy.fault_next_blobs(100, Fault::Html);
    let err = imgfs_err(cache.path(), &["fetch", &image]);
    assert!(
        err.contains(&format!(
            "{layer}: digest mismatch: received 70 bytes of content-type text/html"
        )) && err.contains(&format!(
            "the descriptor says {} bytes",
            img.layers[0].blob.len()
        )),
        "{err}"
    );
    assert!(!err.contains("interrupted"), "{err}");
    assert_eq!(blob_requests(&proxy).len(), 2, "{:?}", proxy.log());
    assert_nothing_kept(cache.path(), layer.hex());
}

#[test]
fn a_descriptor_larger_than_its_blob_is_named_not_called_416() {
    let reg = registry();
    let (img, _) = big_image("test/short", 9);
    let layer = img.layers[0].digest();
    let size = img.layers[0].blob.len();
    // The same image, its layer descriptor claiming 1,000 bytes more.
    let mut manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    manifest["layers"][0]["size"] = (size + 1000).into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    rt().block_on(async {
        imgfs::registry::Client::new(Default::default())
            .unwrap()
            .push_manifest(
                &reg.host,
                "test/short",
                "longer",
                img.manifest_media_type,
                bytes.into(),
            )
            .await
            .unwrap()
    });
    let cache = tempfile::tempdir().unwrap();
    let err = imgfs_err(
        cache.path(),
        &["fetch", &format!("{}/test/short:longer", reg.host)],
    );
    assert!(
        err.contains(&format!(
            "{layer}: the registry's blob is shorter than the manifest's descriptor claims: it \
             has {size} bytes (and they match the digest), the descriptor says {}",
            size + 1000
        )),
        "{err}"
    );
    assert!(!err.contains("416"), "{err}");
    assert_nothing_kept(cache.path(), layer.hex());
}

#[test]
fn a_mirror_that_stalls_is_passed_over_for_the_registry() {
    let reg = registry();
    let (img, name) = big_image("test/slow-mirror", 10);
    let mirror = Proxy::start(&reg.host);
    // The layer's body stalls (its config comes whole): the download resumes at the registry.
    mirror.stall_next(
        Target::Path(img.layers[0].digest().hex().to_string()),
        1000,
        Stall::Trickle(Duration::from_millis(1500)),
    );
    let cache = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = imgfs_env(
        cache.path(),
        &[
            "fetch",
            "--mirror",
            &mirror.host,
            &format!("{}/{name}", reg.host),
        ],
        FAST_STALLS,
    );
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One stalled attempt at the mirror, then the registry.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(blob_requests(&mirror).len(), 2, "{:?}", mirror.log());
    let stored = std::fs::read(
        cache
            .path()
            .join("blobs/sha256")
            .join(img.layers[0].digest().hex()),
    )
    .unwrap();
    assert_eq!(stored, img.layers[0].blob);
}
