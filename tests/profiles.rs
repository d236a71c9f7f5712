//! Access profiles: a mount records which spans and chunks a workload read
//! (`--record-profile`), `index push --profile` publishes the profile with the indexes, and a
//! mount from an empty cache fetches what it names at once — before any file is read — so
//! that the workload's reads find their bytes local. A profile is a hint: garbage, a stale
//! one, or bytes corrupted on the way never change what a read returns.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::estargz::{self, Entry};
use common::layers::Tar;
use common::mounted::Mounted;
use common::proxy::{Fault, Proxy};
use common::*;
use imgfs::digest::Digest;

const KIB: usize = 1 << 10;
const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

struct Fixture {
    img: FixtureImage,
    /// Path in the image and contents.
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Fixture {
    fn bytes(&self, path: &str) -> &[u8] {
        &self.files.iter().find(|(p, _)| *p == path).unwrap().1
    }
}

/// A gzip layer whose files lie in different spans (indexed with 256 KiB spans), and an
/// eStargz layer read chunk by chunk.
fn fixture(seed: u64) -> Fixture {
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("g/a.bin", noise(600 * KIB, seed)),
        ("g/small.txt", b"read at start-up\n".to_vec()),
        ("g/b.bin", noise(600 * KIB, seed + 1)),
        ("g/c.txt", text(50 * KIB, seed + 2)),
        ("g/d.bin", noise(600 * KIB, seed + 3)),
        ("e/one", text(5000, seed + 4)),
        ("e/two", noise(200 * KIB, seed + 5)),
        ("e/three", text(3000, seed + 6)),
    ];
    let mut tar = Tar::new().dir("g", 0o755);
    for (p, d) in &files[..5] {
        tar = tar.file(p, 0o644, d);
    }
    let mut entries = vec![Entry::Dir {
        path: "e".into(),
        mode: 0o755,
    }];
    for (p, d) in &files[5..] {
        entries.push(Entry::File {
            path: (*p).into(),
            mode: 0o644,
            data: d.clone(),
        });
    }
    let e = estargz::build(&entries, 64 * KIB, &[]);
    let mut annotations = serde_json::Map::new();
    annotations.insert(TOC_ANNOTATION.into(), e.toc_digest.to_string().into());
    let stargz = FixtureLayer {
        blob: e.blob.clone(),
        media_type: imgfs::manifest::media::OCI_LAYER_GZIP,
        diff_id: e.diff_id.clone(),
        annotations,
    };
    let img = FixtureImage::new("amd64", vec![FixtureLayer::from_tar(tar.bytes()), stargz]);
    Fixture { img, files }
}

/// Blob GETs of image layers in the proxy's log (not indexes or profiles).
fn layer_gets(proxy: &Proxy, img: &FixtureImage) -> Vec<String> {
    proxy
        .log()
        .into_iter()
        .filter(|l| l.starts_with("GET") && img.layers.iter().any(|x| l.contains(x.digest().hex())))
        .collect()
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Wait until `cond` holds (a background fetch has landed), at most 20 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_profile(path: &Path) -> imgfs::profile::Profile {
    imgfs::profile::Profile::parse(&std::fs::read(path).unwrap()).unwrap()
}

/// How many of the spans at `offsets` of `layer` (as the index in `built` numbers them) are
/// in the chunk store of cache `cache`.
fn spans_stored(built: &Path, cache: &Path, layer: &Digest, offsets: &[u64]) -> usize {
    let bytes = std::fs::read(built.join("indexes/sha256").join(layer.hex())).unwrap();
    let sp = imgfs::index::codec::decode(layer, &bytes)
        .unwrap()
        .seek
        .unwrap();
    offsets
        .iter()
        .filter(|&&at| {
            let k = sp
                .checkpoints
                .iter()
                .position(|c| c.in_offset == at)
                .unwrap();
            let name = sp.span_digests[k].hex();
            cache.join("chunks/blake3").join(name).is_file()
        })
        .count()
}

/// Runs of consecutive spans among the profile's reads of `layer` (as the index in `cache`
/// numbers spans): what one request each can fetch.
fn span_runs(cache: &Path, layer: &Digest, offsets: &[u64]) -> usize {
    let bytes = std::fs::read(cache.join("indexes/sha256").join(layer.hex())).unwrap();
    let index = imgfs::index::codec::decode(layer, &bytes).unwrap();
    let cps = &index.seek.unwrap().checkpoints;
    let mut ks: Vec<usize> = offsets
        .iter()
        .map(|&at| cps.iter().position(|c| c.in_offset == at).unwrap())
        .collect();
    ks.sort();
    ks.dedup();
    1 + ks.windows(2).filter(|w| w[1] != w[0] + 1).count()
}

#[test]
fn a_published_profile_is_fetched_at_mount_before_any_read() {
    let reg = registry();
    let fx = fixture(100);
    let repo = "profiles/published";
    fx.img.push(&reg.host, repo, "v1");
    let direct = format!("{}/{repo}:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    imgfs_ok(&a, &["index", "push", "--span-size", "256KiB", &direct]);

    // Machine A records a workload: two files of each layer.
    let recorded = work.path().join("start.profile");
    let mnt = work.path().join("mnt-a");
    let m = Mounted::new(
        &a,
        &direct,
        &mnt,
        &["--record-profile", recorded.to_str().unwrap()],
    );
    for p in ["g/small.txt", "g/d.bin", "e/one", "e/two"] {
        assert_eq!(std::fs::read(mnt.join(p)).unwrap(), fx.bytes(p), "{p}");
    }
    m.unmount(&a);
    let profile = read_profile(&recorded);
    let by_layer = profile.by_layer();
    let (gz, sg) = (fx.img.layers[0].digest(), fx.img.layers[1].digest());
    let gz_reads = by_layer[&gz].clone();
    let sg_reads = by_layer[&sg].clone();
    // small.txt's span and d.bin's three or four; e/one's chunk and e/two's four.
    assert!((3..=6).contains(&gz_reads.len()), "{profile:?}");
    assert_eq!(sg_reads.len(), 5, "{profile:?}");

    let out = imgfs_ok(
        &a,
        &[
            "index",
            "push",
            "--profile",
            recorded.to_str().unwrap(),
            &direct,
        ],
    );
    assert!(
        out.contains(&format!(
            "an access profile of {} reads",
            profile.reads.len()
        )),
        "{out}"
    );

    // Machine B: nothing cached, through a counting proxy; the mount is ready, nothing read.
    let proxy = Proxy::start(&reg.host);
    let b = work.path().join("b");
    let image = format!("{}/{repo}:v1", proxy.host);
    let mnt = work.path().join("mnt-b");
    let m = Mounted::new(&b, &image, &mnt, &[]);
    let (spans, chunks) = (b.join("chunks/blake3"), b.join("chunks/sha256"));
    // The eStargz TOC is a chunk too.
    wait_for("the profile's spans and chunks", || {
        spans_stored(&a, &b, &gz, &gz_reads) == gz_reads.len()
            && files_in(&chunks) == sg_reads.len() + 1
    });
    // Each span came with its window (the published index is slim: windows apart).
    assert_eq!(
        files_in(&spans),
        2 * gz_reads.len() - usize::from(gz_reads.contains(&0))
    );
    // Adjacent spans went in one request each; each chunk alone.
    let gz_gets = layer_gets(&proxy, &fx.img)
        .into_iter()
        .filter(|l| l.contains(gz.hex()))
        .count();
    assert!(
        gz_gets <= span_runs(&a, &gz, &gz_reads),
        "{gz_gets} requests for {} spans: {:?}",
        gz_reads.len(),
        proxy.log()
    );
    assert!(
        b.join(format!("indexes/sha256/{}.profile", fx.img.digest().hex()))
            .is_file(),
        "the published profile is cached beside the published indexes"
    );

    // The workload now reads without a request; what it did not read is not there.
    proxy.reset_counts();
    for p in ["g/small.txt", "g/d.bin", "e/one", "e/two"] {
        assert_eq!(std::fs::read(mnt.join(p)).unwrap(), fx.bytes(p), "{p}");
    }
    assert_eq!(layer_gets(&proxy, &fx.img), Vec::<String>::new());
    assert_eq!(
        std::fs::read(mnt.join("g/b.bin")).unwrap(),
        fx.bytes("g/b.bin")
    );
    assert!(!layer_gets(&proxy, &fx.img).is_empty());
    m.unmount(&b);

    // `cat` reads one file: it takes the published indexes, but not the profile (a hint for
    // what a mount's workload will read).
    let published = b.join(format!("indexes/sha256/{}.profile", fx.img.digest().hex()));
    let profile_blob = Digest::of(&std::fs::read(&published).unwrap());
    let d = work.path().join("d");
    proxy.reset_counts();
    let out = imgfs_ok(&d, &["cat", &image, "g/small.txt"]);
    assert_eq!(out.as_bytes(), fx.bytes("g/small.txt"));
    let log = proxy.log();
    assert!(
        !log.iter().any(|l| l.contains(profile_blob.hex())),
        "cat fetched the profile: {log:?}"
    );
    assert!(
        d.join(format!("indexes/sha256/{}.published", gz.hex()))
            .is_file(),
        "cat did not use the published index: {log:?}"
    );
    assert!(!d.join(published.strip_prefix(&b).unwrap()).exists());

    // --no-remote-index: neither the published indexes nor the profile.
    let c = work.path().join("c");
    let m = Mounted::new(
        &c,
        &image,
        &work.path().join("mnt-c"),
        &["--no-remote-index"],
    );
    m.unmount(&c);
    let kept: Vec<_> = std::fs::read_dir(c.join("indexes/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.'))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

#[test]
fn garbage_stale_or_corrupted_profiles_still_give_the_right_bytes() {
    let reg = registry();
    let fx = fixture(200);
    let repo = "profiles/hints";
    fx.img.push(&reg.host, repo, "v1");
    let direct = format!("{}/{repo}:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    imgfs_ok(&a, &["index", "push", "--span-size", "256KiB", &direct]);
    let (gz, sg) = (fx.img.layers[0].digest(), fx.img.layers[1].digest());
    let all = [
        "g/a.bin",
        "g/small.txt",
        "g/d.bin",
        "e/one",
        "e/two",
        "e/three",
    ];
    let check = |mnt: &Path| {
        for p in all {
            assert_eq!(std::fs::read(mnt.join(p)).unwrap(), fx.bytes(p), "{p}");
        }
    };

    let garbage = work.path().join("garbage.profile");
    std::fs::write(&garbage, b"\x1f\x8b not a profile at all").unwrap();
    // A profile of another image: layers it does not have, offsets past the end, at no
    // chunk, in the middle of a span.
    let stale = work.path().join("stale.profile");
    let p = imgfs::profile::Profile {
        version: imgfs::profile::VERSION,
        layers: vec![Digest::of(b"another layer"), gz.clone(), sg.clone()],
        reads: vec![
            (0, 0),
            (1, 1 << 40),
            (1, 12_345),
            (2, 7),
            (2, 1 << 40),
            (9, 0),
        ],
    };
    std::fs::write(&stale, p.to_bytes()).unwrap();
    let newer = work.path().join("newer.profile");
    std::fs::write(&newer, br#"{"version":99,"whatever":true}"#).unwrap();
    for (i, f) in [&garbage, &stale, &newer].into_iter().enumerate() {
        let cache = work.path().join(format!("c{i}"));
        let mnt = work.path().join(format!("mnt{i}"));
        let m = Mounted::new(&cache, &direct, &mnt, &["--profile", f.to_str().unwrap()]);
        check(&mnt);
        m.unmount(&cache);
    }
    std::fs::create_dir_all(work.path().join("mnt9")).unwrap();
    let err = imgfs_err(
        &work.path().join("c9"),
        &[
            "mount",
            &direct,
            work.path().join("mnt9").to_str().unwrap(),
            "--profile",
            "/no/such/profile",
        ],
    );
    assert!(err.contains("/no/such/profile"), "{err}");
    let err = imgfs_err(
        &a,
        &[
            "index",
            "push",
            "--profile",
            garbage.to_str().unwrap(),
            &direct,
        ],
    );
    assert!(err.contains("not a profile"), "{err}");

    // A good profile whose first range comes back corrupted: that span is dropped, and the
    // read that needs it fetches it again. Only the gzip layer is mounted (`--layer 1`), so
    // the corruption cannot hit the eStargz TOC instead; the profile's eStargz reads are
    // passed over.
    let recorded = work.path().join("good.profile");
    let mnt = work.path().join("mnt-rec");
    let m = Mounted::new(
        &a,
        &direct,
        &mnt,
        &["--record-profile", recorded.to_str().unwrap()],
    );
    check(&mnt);
    m.unmount(&a);
    let proxy = Proxy::start(&reg.host);
    let cache = work.path().join("corrupt");
    let mnt = work.path().join("mnt-corrupt");
    proxy.corrupt_next_ranges_of(gz.hex(), 1);
    let m = Mounted::new(
        &cache,
        &format!("{}/{repo}:v1", proxy.host),
        &mnt,
        &["--layer", "1", "--profile", recorded.to_str().unwrap()],
    );
    wait_for("the profile's fetches", || {
        !layer_gets(&proxy, &fx.img).is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = layer_gets(&proxy, &fx.img).len();
    for p in ["g/a.bin", "g/small.txt", "g/d.bin"] {
        assert_eq!(std::fs::read(mnt.join(p)).unwrap(), fx.bytes(p), "{p}");
    }
    assert!(
        layer_gets(&proxy, &fx.img).len() > before,
        "the corrupted span was fetched again: {:?}",
        proxy.log()
    );
    m.unmount(&cache);
}

#[test]
fn reads_wait_for_the_profile_fetch_instead_of_fetching_again() {
    let reg = registry();
    let fx = fixture(300);
    let repo = "profiles/concurrent";
    fx.img.push(&reg.host, repo, "v1");
    let direct = format!("{}/{repo}:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    imgfs_ok(&a, &["index", "push", "--span-size", "256KiB", &direct]);
    let workload = ["g/small.txt", "g/d.bin", "e/one", "e/two"];
    let recorded = work.path().join("start.profile");
    let mnt = work.path().join("mnt-a");
    let m = Mounted::new(
        &a,
        &direct,
        &mnt,
        &["--record-profile", recorded.to_str().unwrap()],
    );
    for p in workload {
        std::fs::read(mnt.join(p)).unwrap();
    }
    m.unmount(&a);
    let profile = read_profile(&recorded);
    let (gz, sg) = (fx.img.layers[0].digest(), fx.img.layers[1].digest());
    let runs = span_runs(&a, &gz, &profile.by_layer()[&gz]);
    let chunks = profile.by_layer()[&sg].len();

    // A slow registry: every blob answer waits 400 ms, so the workload starts while the
    // profile's requests are still out.
    let proxy = Proxy::start(&reg.host);
    proxy.fault_next_blobs(1000, Fault::Delay(Duration::from_millis(400)));
    let b = work.path().join("b");
    let mnt = work.path().join("mnt-b");
    let m = Mounted::new(
        &b,
        &format!("{}/{repo}:v1", proxy.host),
        &mnt,
        &["--profile", recorded.to_str().unwrap()],
    );
    std::thread::scope(|s| {
        for p in workload {
            let (mnt, fx) = (&mnt, &fx);
            s.spawn(move || assert_eq!(std::fs::read(mnt.join(p)).unwrap(), fx.bytes(p), "{p}"));
        }
    });
    let gets = |d: &Digest| {
        layer_gets(&proxy, &fx.img)
            .into_iter()
            .filter(|l| l.contains(d.hex()))
            .count()
    };
    // One request per run of spans, one per chunk (and the eStargz footer and TOC): a read
    // that had gone its own way would have made one more.
    assert!(gets(&gz) <= runs, "{:?}", proxy.log());
    assert!(gets(&sg) <= chunks + 2, "{:?}", proxy.log());
    m.unmount(&b);
}
