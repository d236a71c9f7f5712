//! eStargz: an image whose layers carry the TOC annotation mounts without downloading a layer
//! (only the footers, TOCs and the chunks read or marked for prefetch), its tree equals the
//! pull of its plain-gzip twin, and a tampered TOC or chunk is refused.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::compare::assert_same_tree;
use common::containerd::Containerd;
use common::estargz::{self, Entry};
use common::mounted::Mounted;
use common::proxy::Proxy;
use common::*;

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const CHUNK: usize = 64 << 10;

fn file(path: &str, data: Vec<u8>) -> Entry {
    Entry::File {
        path: path.into(),
        mode: 0o644,
        data,
    }
}

fn dir(path: &str) -> Entry {
    Entry::Dir {
        path: path.into(),
        mode: 0o755,
    }
}

/// The layers' entries: a base with small, chunked and linked files, and a layer that
/// deletes one file and replaces another.
fn layer_entries() -> (Vec<Entry>, Vec<Entry>) {
    let base = vec![
        dir("etc"),
        file("etc/hostname", b"estargz\n".to_vec()),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/tool", text(5000, 7)),
        file("usr/bin/big", noise(3 * CHUNK + 1234, 8)),
        file("usr/bin/exact", text(CHUNK, 9)),
        file("usr/bin/empty", Vec::new()),
        Entry::Symlink {
            path: "bin".into(),
            target: "usr/bin".into(),
        },
        Entry::Hardlink {
            path: "usr/bin/tool-again".into(),
            target: "usr/bin/tool".into(),
        },
        dir("var"),
        file("var/gone", b"deleted by the next layer".to_vec()),
    ];
    let top = vec![
        dir("var"),
        file("var/.wh.gone", Vec::new()),
        dir("etc"),
        file("etc/hostname", b"replaced\n".to_vec()),
        file("etc/motd", noise(100_000, 10)),
    ];
    (base, top)
}

/// eStargz's own entries, which a mount does not show.
fn is_estargz_own(path: &str) -> bool {
    let p = path.trim_start_matches("./");
    matches!(
        p,
        "stargz.index.json" | ".prefetch.landmark" | ".no.prefetch.landmark"
    )
}

/// The plain tar of an eStargz blob without eStargz's own entries: the gzip twin's layer.
fn twin_tar(blob: &[u8]) -> Vec<u8> {
    let mut src = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut out = tar::Builder::new(Vec::new());
    for item in src.entries().unwrap() {
        let mut item = item.unwrap();
        let path = String::from_utf8_lossy(&item.path_bytes()).into_owned();
        if is_estargz_own(&path) {
            continue;
        }
        let mut header = item.header().clone();
        let mut data = Vec::new();
        item.read_to_end(&mut data).unwrap();
        match header.entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = item.link_name().unwrap().unwrap().into_owned();
                out.append_link(&mut header, &path, target).unwrap();
            }
            _ => out.append_data(&mut header, &path, &data[..]).unwrap(),
        }
    }
    out.into_inner().unwrap()
}

fn stargz_layer(e: &estargz::Estargz, annotated_toc: &str) -> FixtureLayer {
    let mut annotations = serde_json::Map::new();
    annotations.insert(TOC_ANNOTATION.into(), annotated_toc.into());
    FixtureLayer {
        blob: e.blob.clone(),
        media_type: imgfs::manifest::media::OCI_LAYER_GZIP,
        diff_id: e.diff_id.clone(),
        annotations,
    }
}

struct Images {
    proxy: Proxy,
    stargz: String,
    twin: String,
    blobs: Vec<estargz::Estargz>,
}

fn push_images(repo: &str) -> Images {
    let reg = registry();
    let (base, top) = layer_entries();
    let l1 = estargz::build(&base, CHUNK, &["usr/bin/big", "etc/hostname"]);
    let l2 = estargz::build(&top, CHUNK, &[]);
    estargz::self_check(&l1, &base);
    estargz::self_check(&l2, &top);
    FixtureImage::new(
        "amd64",
        vec![
            stargz_layer(&l1, l1.toc_digest.as_str()),
            stargz_layer(&l2, l2.toc_digest.as_str()),
        ],
    )
    .push(&reg.host, repo, "stargz");
    FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(twin_tar(&l1.blob)),
            FixtureLayer::from_tar(twin_tar(&l2.blob)),
        ],
    )
    .push(&reg.host, repo, "gzip");
    let proxy = Proxy::start(&reg.host);
    Images {
        stargz: format!("{}/{repo}:stargz", proxy.host),
        twin: format!("{}/{repo}:gzip", reg.host),
        proxy,
        blobs: vec![l1, l2],
    }
}

#[test]
fn an_estargz_image_mounts_without_a_layer_download_and_equals_its_gzip_twin() {
    let im = push_images("stargz/mount");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let pulled = work.path().join("pulled");
    imgfs_ok(
        &work.path().join("pull-cache"),
        &["pull", "-q", &im.twin, pulled.to_str().unwrap()],
    );

    let m = Mounted::new(
        &cache,
        &im.stargz,
        &work.path().join("mnt"),
        &["--prefetch", "none"],
    );
    let layers: u64 = im.blobs.iter().map(|b| b.blob.len() as u64).sum();
    let until_ready = im.proxy.blob_bytes();
    let whole_gets = im
        .proxy
        .log()
        .iter()
        .filter(|l| l.contains("/blobs/") && !l.to_ascii_lowercase().contains("range:"))
        .count();
    // The config is the only blob fetched whole.
    assert_eq!(whole_gets, 1, "{:?}", im.proxy.log());
    assert!(
        until_ready < layers / 4,
        "{until_ready} bytes of {layers} fetched before the mount was ready"
    );
    assert_eq!(
        count_files(&cache.join("indexes/sha256")),
        0,
        "no layer was indexed"
    );

    assert_same_tree(&m.dir, &pulled, "eStargz mount vs pull of the gzip twin");
    assert!(!m.dir.join("stargz.index.json").exists());
    m.unmount(&cache);
}

#[test]
fn files_marked_for_prefetch_arrive_in_the_background() {
    let im = push_images("stargz/prefetch");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let m = Mounted::new(&cache, &im.stargz, &work.path().join("mnt"), &[]);
    // usr/bin/big is 4 chunks, etc/hostname 1; plus the two TOCs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_files(&cache.join("chunks/sha256")) < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count_files(&cache.join("chunks/sha256")), 7);
    im.proxy.reset_counts();
    let (base, _) = layer_entries();
    let Entry::File { data, .. } = &base[5] else {
        unreachable!()
    };
    assert!(std::fs::read(m.dir.join("usr/bin/big")).unwrap() == *data);
    assert_eq!(
        im.proxy.blob_bytes(),
        0,
        "prefetched: nothing more to fetch"
    );
    m.unmount(&cache);
}

#[test]
fn a_tampered_toc_or_chunk_is_refused() {
    let reg = registry();
    let (base, _) = layer_entries();
    let good = estargz::build(&base, CHUNK, &[]);

    // The annotation names another TOC than the one in the blob.
    let wrong_toc = imgfs::digest::Digest::of(b"some other toc");
    FixtureImage::new("amd64", vec![stargz_layer(&good, wrong_toc.as_str())]).push(
        &reg.host,
        "stargz/tampered",
        "toc",
    );
    let work = tempfile::tempdir().unwrap();
    let err = imgfs_err(
        &work.path().join("c1"),
        &["ls", &format!("{}/stargz/tampered:toc", reg.host), "/"],
    );
    assert!(
        err.contains("TOC") && err.contains(wrong_toc.as_str()),
        "{err}"
    );

    // One byte of a chunk flipped (the blob is pushed as it is, so its digest matches).
    let mut bad = good.blob.clone();
    let target = chunk_offset_of(&good.toc_json, "usr/bin/big") as usize + 40;
    bad[target] ^= 0x20;
    let tampered = estargz::Estargz {
        blob: bad,
        ..good.clone()
    };
    FixtureImage::new(
        "amd64",
        vec![stargz_layer(&tampered, good.toc_digest.as_str())],
    )
    .push(&reg.host, "stargz/tampered", "chunk");
    let image = format!("{}/stargz/tampered:chunk", reg.host);
    let cache = work.path().join("c2");
    let out = imgfs(&cache, &["cat", &image, "usr/bin/big"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eStargz chunk"), "{err}");
    let Entry::File { data: big, .. } = &base[5] else {
        unreachable!()
    };
    assert!(
        big.starts_with(&out.stdout),
        "only right bytes before the refusal"
    );
    // The other files still read.
    assert_eq!(
        imgfs_ok(&cache, &["cat", &image, "etc/hostname"]),
        "estargz\n"
    );
}

/// The `offset` the TOC records for `name`'s first chunk.
fn chunk_offset_of(toc: &[u8], name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(toc).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name && e["type"] == "reg")
        .and_then(|e| e["offset"].as_u64())
        .unwrap()
}

#[test]
fn layers_converted_by_stargz_snapshotter_mount_like_the_original() {
    let reg = registry();
    let (base, top) = layer_entries();
    let tar_of_entries = |entries: &[Entry]| {
        // The plain twin of what our builder makes is a valid source image.
        twin_tar(&estargz::build(entries, CHUNK, &[]).blob)
    };
    FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(tar_of_entries(&base)),
            FixtureLayer::from_tar(tar_of_entries(&top)),
        ],
    )
    .push(&reg.host, "stargz/ctr", "gzip");
    let src = format!("{}/stargz/ctr:gzip", reg.host);
    let dst = format!("{}/stargz/ctr:esgz", reg.host);
    let ctd = Containerd::start();
    ctd.ctr_ok(&["images", "pull", "--plain-http", &src]);
    ctd.ctr_ok(&["images", "optimize", "--no-optimize", "--oci", &src, &dst]);
    ctd.ctr_ok(&["images", "push", "--plain-http", &dst, &dst]);

    let work = tempfile::tempdir().unwrap();
    let v = inspect_json(&work.path().join("c0"), &dst, &[]);
    let annotated = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"][TOC_ANNOTATION].is_string())
        .count();
    assert_eq!(annotated, 2, "{v:#}");

    let proxy = Proxy::start(&reg.host);
    let via_proxy = format!("{}/stargz/ctr:esgz", proxy.host);
    let pulled = work.path().join("pulled");
    imgfs_ok(
        &work.path().join("c1"),
        &["pull", "-q", &src, pulled.to_str().unwrap()],
    );
    let cache = work.path().join("c2");
    let m = Mounted::new(
        &cache,
        &via_proxy,
        &work.path().join("mnt"),
        &["--prefetch", "none"],
    );
    assert_eq!(
        count_files(&cache.join("indexes/sha256")),
        0,
        "read through the TOCs"
    );
    let whole_gets = proxy
        .log()
        .iter()
        .filter(|l| l.contains("/blobs/") && !l.to_ascii_lowercase().contains("range:"))
        .count();
    assert_eq!(whole_gets, 1, "only the config: {:?}", proxy.log());
    assert_same_tree(
        &m.dir,
        &pulled,
        "mount of ctr-remote's eStargz vs pull of the original",
    );
    m.unmount(&cache);
}

#[test]
fn a_read_brings_the_chunks_after_its_own_in_the_same_request() {
    let im = push_images("stargz/region");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let m = Mounted::new(
        &cache,
        &im.stargz,
        &work.path().join("mnt"),
        &["--prefetch", "none"],
    );
    let (base, _) = layer_entries();
    let content = |i: usize| match &base[i] {
        Entry::File { data, .. } => data.clone(),
        _ => unreachable!(),
    };
    let ranged = |p: &Proxy| {
        p.log()
            .iter()
            .filter(|l| l.contains("/blobs/") && l.to_ascii_lowercase().contains("range:"))
            .count()
    };
    im.proxy.reset_counts();
    assert!(std::fs::read(m.dir.join("usr/bin/tool")).unwrap() == content(4));
    assert_eq!(ranged(&im.proxy), 1, "{:?}", im.proxy.log());
    // The next file in the blob came with it, verified chunk by chunk.
    assert!(std::fs::read(m.dir.join("usr/bin/exact")).unwrap() == content(6));
    assert!(
        std::fs::read(m.dir.join("var/gone")).is_err(),
        "whited out above"
    );
    assert_eq!(ranged(&im.proxy), 1, "{:?}", im.proxy.log());
    m.unmount(&cache);
}
