//! A registry reached through a misbehaving proxy: cut downloads resume with `Range` and still
//! verify, a registry that ignores `Range` is handled, and 5xx answers are retried with backoff.

mod common;

use common::*;

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
