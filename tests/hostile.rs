//! Hostile and malformed images, each given to `pull` and to `ls`/`cat` (the index and tree a
//! mount serves): refused with a message that names the problem, or handled safely, with
//! memory bounded. Traversal, link escapes, loops and truncation are in tests/pull.rs too.

mod common;

use std::io::Write;

use bytes::Bytes;
use common::layers::Tar;
use common::*;
use imgfs::digest::Digest;
use imgfs::manifest::media;
use imgfs::registry::{Client, ClientOptions};
use serde_json::json;

/// Push an image whose config and layers are given as raw bytes (with their media types).
fn push_raw(repo: &str, config: &[u8], layers: &[(&str, Vec<u8>)]) -> String {
    let reg = registry();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": layers.iter().map(|(mt, b)| json!({
            "mediaType": mt, "digest": Digest::of(b).to_string(), "size": b.len(),
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    rt().block_on(async {
        let c = Client::new(ClientOptions::default()).unwrap();
        for (_, b) in layers {
            c.push_blob(&reg.host, repo, Bytes::from(b.clone()))
                .await
                .unwrap();
        }
        c.push_blob(&reg.host, repo, Bytes::from(config.to_vec()))
            .await
            .unwrap();
        c.push_manifest(
            &reg.host,
            repo,
            "v1",
            media::OCI_MANIFEST,
            Bytes::from(manifest),
        )
        .await
        .unwrap();
    });
    format!("{}/{repo}:v1", reg.host)
}

fn config_for(layers: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": vec![Digest::of(b"unchecked").to_string(); layers]},
    }))
    .unwrap()
}

/// `pull` and `ls -R` of `image` both fail; returns their messages. A failed pull leaves
/// nothing behind.
fn both_refuse(image: &str, extra: &[&str]) -> (String, String) {
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("rootfs");
    let mut pull = extra.to_vec();
    pull.extend(["pull", "-q", image, target.to_str().unwrap()]);
    let pull_err = imgfs_err(&work.path().join("c1"), &pull);
    assert!(!target.exists(), "a failed pull leaves no target");
    let left = pull_build_dirs(work.path());
    assert!(left.is_empty(), "a failed pull left {left:?}");
    let mut ls = extra.to_vec();
    ls.extend(["ls", "-R", image]);
    let ls_err = imgfs_err(&work.path().join("c2"), &ls);
    (pull_err, ls_err)
}

fn gzip_fast(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A tar member header of `kind` claiming `size` bytes, followed by that many zeros: what
/// a gzip bomb hides in a metadata member.
fn bomb_member(kind: u8, size: usize) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path("././@LongLink").unwrap();
    h.set_size(size as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    let mut t = h.as_bytes().to_vec();
    t.resize(512 + size, 0);
    t
}

#[test]
fn gzip_bombs_in_metadata_members_are_refused_from_their_header() {
    for (kind, name, says) in [
        (b'L', "longname", "GNU long name"),
        (b'x', "pax", "PAX header"),
    ] {
        let blob = gzip_fast(&bomb_member(kind, 64 << 20));
        assert!(blob.len() < 1 << 20, "a bomb: {} bytes", blob.len());
        let image = push_raw(
            &format!("hostile/bomb-{name}"),
            &config_for(1),
            &[(media::OCI_LAYER_GZIP, blob)],
        );
        let (pull, ls) = both_refuse(&image, &[]);
        for err in [pull, ls] {
            assert!(
                err.contains(says) && err.contains("67108864 bytes"),
                "{err}"
            );
        }
    }
}

#[test]
fn a_layer_past_the_uncompressed_limit_is_refused() {
    let tar = Tar::new()
        .file("zeros", 0o644, &vec![0u8; 20 << 20])
        .bytes();
    let image = push_raw(
        "hostile/expands",
        &config_for(1),
        &[(media::OCI_LAYER_GZIP, gzip_fast(&tar))],
    );
    let (pull, ls) = both_refuse(&image, &["--max-uncompressed-size", "10MiB"]);
    for err in [pull, ls] {
        assert!(err.contains("--max-uncompressed-size"), "{err}");
    }
    // Under the default limit the same image is fine.
    let work = tempfile::tempdir().unwrap();
    let out = imgfs_ok(work.path(), &["ls", "-l", &image]);
    assert!(out.contains("zeros"), "{out}");
}

#[test]
fn damaged_tar_headers_are_refused_naming_the_problem() {
    let mut bad_sum = Tar::new().file("a", 0o644, b"data").bytes();
    bad_sum[148] ^= 0x01; // the checksum field
    // A header that claims a terabyte, then the stream ends.
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(1 << 40);
    h.set_cksum();
    let mut huge = h.as_bytes().to_vec();
    huge.extend_from_slice(&[1u8; 4096]);
    for (name, tar, says) in [
        ("bad-checksum", bad_sum, "checksum"),
        ("claims-a-terabyte", huge, "huge"),
    ] {
        let image = push_raw(
            &format!("hostile/{name}"),
            &config_for(1),
            &[(media::OCI_LAYER_GZIP, gzip_fast(&tar))],
        );
        let (pull, ls) = both_refuse(&image, &[]);
        for err in [pull, ls] {
            assert!(err.contains("layer") && err.contains(says), "{name}: {err}");
        }
    }
}

#[test]
fn duplicate_entries_resolve_to_the_last_everywhere() {
    let tar = Tar::new()
        .file("dup", 0o644, b"first")
        .file("dup", 0o600, b"second, last")
        .bytes();
    let image = push_raw(
        "hostile/dup",
        &config_for(1),
        &[(media::OCI_LAYER_GZIP, gzip_fast(&tar))],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let out = imgfs(&cache, &["cat", &image, "dup"]);
    assert_eq!(out.stdout, b"second, last");
    let target = work.path().join("rootfs");
    imgfs_ok(&cache, &["pull", "-q", &image, target.to_str().unwrap()]);
    assert_eq!(std::fs::read(target.join("dup")).unwrap(), b"second, last");
    let ls = imgfs_ok(&cache, &["ls", "-l", &image]);
    assert_eq!(ls.matches("dup").count(), 1, "{ls}");
}

#[test]
fn bad_configs_media_types_and_layer_counts() {
    let layer = gzip_fast(&Tar::new().file("f", 0o644, b"x").bytes());
    let image = push_raw(
        "hostile/config",
        b"this is not JSON",
        &[(media::OCI_LAYER_GZIP, layer.clone())],
    );
    let (pull, ls) = both_refuse(&image, &[]);
    for err in [pull, ls] {
        assert!(err.contains("config"), "{err}");
    }

    let image = push_raw(
        "hostile/media-type",
        &config_for(1),
        &[("application/vnd.example.mystery", layer.clone())],
    );
    let (pull, ls) = both_refuse(&image, &[]);
    for err in [pull, ls] {
        assert!(err.contains("application/vnd.example.mystery"), "{err}");
    }

    // 10,000 layers (one blob, listed again and again): refused with a clear message
    // rather than worked through.
    let many: Vec<(&str, Vec<u8>)> = (0..10_000)
        .map(|_| (media::OCI_LAYER_GZIP, layer.clone()))
        .collect();
    let image = push_raw("hostile/many-layers", &config_for(10_000), &many);
    let (pull, ls) = both_refuse(&image, &[]);
    for err in [pull, ls] {
        assert!(err.contains("10000 layers"), "{err}");
    }
}
