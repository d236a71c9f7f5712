//! Lazy reads: with indexes cached and no blobs, `cat` and a mount fetch only the spans they
//! need, by range, through a loopback proxy in front of the real registry that counts the
//! bytes it serves and can corrupt a range, trickle it, or ignore `Range`. Wrong bytes are
//! never served; a stalled range fails the read within a bound; the cache can be pruned
//! under a running mount.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::compare::assert_same_tree;
use common::layers::Tar;
use common::mounted::Mounted;
use common::proxy::{Proxy, Stall, Target};
use common::*;

const MIB: usize = 1 << 20;

struct Lazy {
    proxy: Proxy,
    image: String,
    direct: String,
    files: Vec<(&'static str, Vec<u8>)>,
    gzip_layer_size: u64,
}

/// Three layers: gzip (several 4 MiB spans: noise, a small file, text — more pieces than a
/// mount keeps decompressed in memory), zstd, plain tar (two spans). Reached through a fresh proxy.
fn lazy_image(repo: &str) -> Lazy {
    let reg = registry();
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("big/noise.bin", noise(10 * MIB, 1)),
        (
            "mid/small.txt",
            b"small file between two big ones\n".to_vec(),
        ),
        ("big/text.bin", text(6 * MIB, 2)),
        ("z/zfile", text(300_000, 3)),
        ("p/plain.bin", noise(5 * MIB, 4)),
        ("p/first.txt", b"first in the plain layer".to_vec()),
    ];
    let l1 = Tar::new()
        .dir("big", 0o755)
        .file(files[0].0, 0o644, &files[0].1)
        .dir("mid", 0o755)
        .file(files[1].0, 0o644, &files[1].1)
        .file(files[2].0, 0o644, &files[2].1)
        .bytes();
    let l2 = Tar::new()
        .dir("z", 0o755)
        .file(files[3].0, 0o644, &files[3].1)
        .bytes();
    let l3 = Tar::new()
        .dir("p", 0o755)
        .file(files[5].0, 0o644, &files[5].1)
        .file(files[4].0, 0o644, &files[4].1)
        .bytes();
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(l1),
            FixtureLayer::zstd_from_tar(l2),
            FixtureLayer::plain_tar(l3),
        ],
    );
    let gzip_layer_size = img.layers[0].blob.len() as u64;
    img.push(&reg.host, repo, "v1");
    let proxy = Proxy::start(&reg.host);
    Lazy {
        image: format!("{}/{repo}:v1", proxy.host),
        direct: format!("{}/{repo}:v1", reg.host),
        proxy,
        files,
        gzip_layer_size,
    }
}

fn cat(cache: &Path, image: &str, path: &str) -> std::process::Output {
    imgfs(cache, &["cat", image, path])
}

fn ranged_gets(proxy: &Proxy) -> usize {
    proxy
        .log()
        .iter()
        .filter(|l| l.contains("/blobs/") && l.to_ascii_lowercase().contains("range:"))
        .count()
}

#[test]
fn a_small_file_costs_one_span_and_a_second_read_nothing() {
    let l = lazy_image("lazy/one-span");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // Indexing streams each blob once and keeps only the index (`index build`; a view
    // that indexes keeps the spans too, below).
    imgfs_ok(&cache, &["index", "build", &l.image]);
    // The config is a blob too.
    assert_eq!(
        count_files(&cache.join("blobs/sha256")),
        1,
        "no layer blob kept"
    );
    assert_eq!(count_files(&cache.join("indexes/sha256")), 3);

    l.proxy.reset_counts();
    let out = cat(&cache, &l.image, "mid/small.txt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, l.files[1].1);
    let served = l.proxy.blob_bytes();
    assert_eq!(ranged_gets(&l.proxy), 1, "{:?}", l.proxy.log());
    assert!(
        served <= (4 * MIB + 128 * 1024) as u64 && served < l.gzip_layer_size / 2,
        "{served} bytes served of a {} byte layer",
        l.gzip_layer_size
    );

    l.proxy.reset_counts();
    let again = cat(&cache, &l.image, "mid/small.txt");
    assert_eq!(again.stdout, l.files[1].1);
    assert_eq!(
        l.proxy.blob_bytes(),
        0,
        "the span came from the chunk store"
    );

    // Whole files across spans, in every layer format.
    for (path, data) in &l.files {
        let out = cat(&cache, &l.image, path);
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *data, "{path}: wrong bytes");
    }
    assert_eq!(
        count_files(&cache.join("blobs/sha256")),
        1,
        "still no layer blob"
    );
    let du = imgfs_ok(&cache, &["cache", "du"]);
    assert!(du.contains("chunks"), "{du}");

    // --keep-blobs keeps them.
    let kept = work.path().join("kept");
    imgfs_ok(&kept, &["ls", "--keep-blobs", &l.image, "/"]);
    assert_eq!(count_files(&kept.join("blobs/sha256")), 4);
}

#[test]
fn wrong_bytes_from_the_registry_are_never_served() {
    let l = lazy_image("lazy/corrupt");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);

    l.proxy.corrupt_next_ranges(1000);
    let out = cat(&cache, &l.image, "big/text.bin");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not match"), "{err}");
    assert!(l.files[2].1.starts_with(&out.stdout), "only right bytes");

    // A mount: the corrupted read is EIO, the rest of the mount works, and reads recover
    // once the bytes are right again.
    let m = Mounted::new(&cache, &l.image, &work.path().join("mnt"), &[]);
    let err = std::fs::read(m.dir.join("mid/small.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read_dir(m.dir.join("big")).unwrap().count(), 2);
    assert_eq!(
        std::fs::metadata(m.dir.join("p/plain.bin")).unwrap().len(),
        5 * MIB as u64
    );
    l.proxy.corrupt_next_ranges(0);
    assert_eq!(
        std::fs::read(m.dir.join("mid/small.txt")).unwrap(),
        l.files[1].1
    );
    assert!(std::fs::read(m.dir.join("big/text.bin")).unwrap() == l.files[2].1);
    m.unmount(&cache);
}

/// Stall rules short enough for tests: no byte for 1 s, or under 200 bytes/s over 1.5 s.
const FAST_STALLS: &[(&str, &str)] = &[
    ("IMGFS_STALL_TIMEOUT", "1"),
    ("IMGFS_LOW_SPEED_LIMIT", "200"),
    ("IMGFS_LOW_SPEED_TIME", "1.5"),
];

#[test]
fn a_read_whose_range_trickles_fails_within_a_bound() {
    let l = lazy_image("lazy/trickle");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);
    let layer = inspect_json(&cache, &l.image, &[]);
    let layer = layer_digests(&layer)[0].clone();

    // A byte every 0.3 s: never 1 s without data, far under 200 bytes/s.
    l.proxy.reset_counts();
    l.proxy.stall_next(
        Target::Ranged("/blobs/".into()),
        1000,
        Stall::Trickle(Duration::from_millis(300)),
    );
    let t = Instant::now();
    let out = imgfs_env(&cache, &["cat", &l.image, "mid/small.txt"], FAST_STALLS);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served through a trickle");
    assert!(out.stdout.is_empty(), "nothing served");
    // Three attempts of 1.5 s; before the rule this waited for the whole trickle (200 s).
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.contains(&format!(
            "registry {}: blob {layer} stalled: ",
            l.proxy.host
        )) && err.contains("under the minimum of 200 bytes/s")
            && err.contains("(3 attempts)"),
        "{err}"
    );
    assert_eq!(ranged_gets(&l.proxy), 3, "{:?}", l.proxy.log());
    assert_eq!(
        count_files(&cache.join("chunks/blake3")),
        0,
        "no chunk stored"
    );
    assert_eq!(count_files(&cache.join("tmp")), 0, "no temporary file");

    // A mount: the read is EIO within the bound, and the mount keeps answering.
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = imgfs_env(
        &cache,
        &[
            "mount",
            &l.image,
            mnt.to_str().unwrap(),
            "--prefetch",
            "none",
        ],
        FAST_STALLS,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted {
        dir: mnt.clone(),
        pid: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
    };
    let t = Instant::now();
    let err = std::fs::read(mnt.join("mid/small.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(std::fs::read_dir(mnt.join("big")).unwrap().count(), 2);
    m.unmount(&cache);
    assert_eq!(
        count_files(&cache.join("chunks/blake3")),
        0,
        "no chunk stored"
    );
}

#[test]
fn a_registry_that_ignores_range_gets_the_whole_blob_once() {
    let l = lazy_image("lazy/no-range");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);
    l.proxy.ignore_range(true);
    let out = cat(&cache, &l.image, "big/text.bin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == l.files[2].1);
    assert_eq!(
        count_files(&cache.join("blobs/sha256")),
        2,
        "config and the gzip layer"
    );
    l.proxy.reset_counts();
    assert_eq!(cat(&cache, &l.image, "big/noise.bin").stdout, l.files[0].1);
    assert_eq!(l.proxy.blob_bytes(), 0);
}

fn drop_page_cache() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn a_lazy_mount_equals_the_pull_and_survives_pruning() {
    let l = lazy_image("lazy/mount");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let pulled = work.path().join("pulled");
    imgfs_ok(
        &work.path().join("pull-cache"),
        &["pull", "-q", &l.direct, pulled.to_str().unwrap()],
    );
    let m = Mounted::new(&cache, &l.image, &work.path().join("mnt"), &[]);
    assert_eq!(
        count_files(&cache.join("blobs/sha256")),
        1,
        "the config only"
    );
    assert_same_tree(&m.dir, &pulled, "lazy mount vs pull");

    let pruned = imgfs_ok(&cache, &["cache", "prune", "--all"]);
    assert!(pruned.starts_with("freed"), "{pruned}");
    assert_eq!(count_files(&cache.join("indexes/sha256")), 0);
    assert_eq!(count_files(&cache.join("chunks/blake3")), 0);
    drop_page_cache();
    l.proxy.reset_counts();
    assert_same_tree(&m.dir, &pulled, "after prune");
    assert!(
        l.proxy.blob_bytes() > 0,
        "read again by range after the prune"
    );
    m.unmount(&cache);
}

#[test]
fn prefetch_all_fetches_every_span_in_the_background() {
    let l = lazy_image("lazy/prefetch");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);
    l.proxy.reset_counts();
    let m = Mounted::new(
        &cache,
        &l.image,
        &work.path().join("mnt"),
        &["--prefetch", "all"],
    );
    // gzip 16 MiB: 4 spans; zstd: 1; plain 5 MiB: 2.
    let chunks = cache.join("chunks/blake3");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (0, Instant::now());
    while Instant::now() < deadline {
        let n = count_files(&chunks);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n >= 6 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(count_files(&chunks) >= 6, "{} chunks", count_files(&chunks));
    // One batch per layer, not one request per span.
    let gets = ranged_gets(&l.proxy);
    assert!(gets <= 4, "{gets} ranged requests: {:?}", l.proxy.log());
    l.proxy.reset_counts();
    for (path, data) in &l.files {
        assert!(std::fs::read(m.dir.join(path)).unwrap() == *data, "{path}");
    }
    assert_eq!(l.proxy.blob_bytes(), 0, "{:?}", l.proxy.log());
    m.unmount(&cache);
}

#[test]
fn a_cold_open_reads_what_indexing_streamed_without_fetching_it_again() {
    let l = lazy_image("lazy/cold");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let layers: u64 = layer_digests(&inspect_json(&work.path().join("i"), &l.direct, &[]))
        .iter()
        .map(|d| {
            std::fs::metadata(registry().blob_data_path(&d.parse().unwrap()))
                .unwrap()
                .len()
        })
        .sum();
    l.proxy.reset_counts();
    // No index anywhere: each layer is streamed once to index it, and its spans stay.
    let out = cat(&cache, &l.image, "big/text.bin");
    assert!(out.stdout == l.files[2].1, "wrong bytes");
    assert_eq!(ranged_gets(&l.proxy), 0, "{:?}", l.proxy.log());
    let config_and_layers = l.proxy.blob_bytes();
    assert!(
        config_and_layers < layers + 4096,
        "{config_and_layers} bytes fetched for {layers} bytes of layers"
    );
    assert_eq!(
        count_files(&cache.join("blobs/sha256")),
        1,
        "only the config blob is kept"
    );
    assert_eq!(
        count_files(&cache.join("tmp")),
        0,
        "nor any copy of a layer"
    );
    for (path, data) in &l.files {
        assert!(cat(&cache, &l.image, path).stdout == *data, "{path}");
    }
    assert_eq!(
        l.proxy.blob_bytes(),
        config_and_layers,
        "every read came from the spans kept"
    );
    // Within the chunk store's bound: a layer that does not fit keeps what fits.
    let small = work.path().join("small");
    let out = imgfs(
        &small,
        &["cat", "--chunk-cache", "5MiB", &l.image, "p/first.txt"],
    );
    assert_eq!(out.stdout, l.files[5].1);
    let stored: u64 = std::fs::read_dir(small.join("chunks/blake3"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(stored <= 5 * MIB as u64, "{stored} bytes of chunks");
}

#[test]
fn the_chunk_store_stays_within_its_bound() {
    let l = lazy_image("lazy/bounded");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);
    // The first file alone (10 MiB of noise) is more than the bound.
    let bound = 5 * MIB as u64;
    for (path, data) in &l.files {
        let out = imgfs(&cache, &["cat", "--chunk-cache", "5MiB", &l.image, path]);
        assert!(out.stdout == *data, "{path}");
        let stored: u64 = std::fs::read_dir(cache.join("chunks/blake3"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(stored <= bound, "{stored} bytes of chunks after {path}");
    }
}

#[test]
fn a_damaged_chunk_in_the_store_is_refetched_not_served() {
    let l = lazy_image("lazy/damaged-chunk");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &l.image]);
    assert_eq!(cat(&cache, &l.image, "mid/small.txt").stdout, l.files[1].1);
    // What a crash between write and rename could leave: the right name, wrong bytes.
    for e in std::fs::read_dir(cache.join("chunks/blake3")).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        std::fs::write(&p, b).unwrap();
    }
    l.proxy.reset_counts();
    assert_eq!(cat(&cache, &l.image, "mid/small.txt").stdout, l.files[1].1);
    assert!(l.proxy.blob_bytes() > 0, "fetched again");
}

/// A file read sequentially through a mount comes in a few growing range requests, each
/// verified span by span, and the read-ahead stops at the file's end: the file after it in
/// the same layer is not fetched.
#[test]
fn a_sequential_read_fetches_ahead_in_a_few_requests_and_not_past_its_file() {
    let reg = registry();
    let first = noise(40 * MIB, 11);
    let second = noise(24 * MIB, 12);
    let layer = Tar::new()
        .file("first.bin", 0o644, &first)
        .file("second.bin", 0o644, &second)
        .bytes();
    let img = FixtureImage::new("amd64", vec![FixtureLayer::from_tar(layer)]);
    img.push(&reg.host, "lazy/readahead", "v1");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/lazy/readahead:v1", proxy.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    imgfs_ok(&cache, &["index", "build", &image]);
    let m = Mounted::new(&cache, &image, &work.path().join("mnt"), &[]);

    proxy.reset_counts();
    assert!(std::fs::read(m.dir.join("first.bin")).unwrap() == first);
    // Noise does not compress: the first file is about 10 spans of 4 MiB.
    let gets = ranged_gets(&proxy);
    assert!(
        (2..=6).contains(&gets),
        "{gets} ranged requests for 10 spans: {:?}",
        proxy.log()
    );
    let served = proxy.blob_bytes();
    assert!(
        served >= first.len() as u64 && served < (first.len() + 5 * MIB) as u64,
        "{served} bytes served for a {} byte file followed by {} more",
        first.len(),
        second.len()
    );
    m.unmount(&cache);
}

#[test]
fn smaller_spans_make_a_small_read_fetch_less_and_read_the_same_bytes() {
    let l = lazy_image("lazy/small-spans");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let built = imgfs_ok(
        &cache,
        &["index", "build", "--span-size", "256KiB", &l.image],
    );
    assert_eq!(built.lines().count(), 3, "{built}");

    l.proxy.reset_counts();
    assert_eq!(cat(&cache, &l.image, "mid/small.txt").stdout, l.files[1].1);
    let served = l.proxy.blob_bytes();
    assert_eq!(ranged_gets(&l.proxy), 1, "{:?}", l.proxy.log());
    assert!(
        served <= 256 * 1024 + 64 * 1024,
        "{served} bytes served for a small file with 256 KiB spans"
    );
    for (path, data) in &l.files {
        let out = cat(&cache, &l.image, path);
        assert!(
            out.stdout == *data,
            "{path}: wrong bytes with 256 KiB spans"
        );
    }

    let refused = imgfs(&cache, &["index", "build", "--span-size", "1KiB", &l.image]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("--span-size") && err.contains("64KiB"),
        "{err}"
    );
}
