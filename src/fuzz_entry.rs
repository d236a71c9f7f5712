//! Entry points for the fuzzers (`fuzz/`, run by `scripts/fuzz`) and for the regression tests
//! that replay what they found (`tests/fuzz_regressions.rs`): each takes arbitrary bytes and
//! must return — an error is fine, a panic, a hang or unbounded memory is a bug.

use crate::digest::Digest;

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, for the regression test.
pub const TARGETS: &[(&str, Target)] = &[
    ("reference", reference),
    ("manifest", manifest),
    ("tar_index", tar_index),
    ("index_decode", index_decode),
    ("estargz_toc", estargz_toc),
    ("artifact", artifact),
];

/// Reference parsing: the text a user types.
pub fn reference(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(r) = crate::reference::ImageRef::parse(s)
    {
        // What parses must print and parse back to the same reference.
        let again = crate::reference::ImageRef::parse(&r.to_string());
        assert!(again.is_ok(), "{s:?} parsed, but its display {r} does not");
    }
}

/// Manifest parsing, then assembling an image with the same bytes as config.
pub fn manifest(data: &[u8]) {
    for ct in [None, Some(crate::manifest::media::OCI_MANIFEST)] {
        if let Ok(parsed) = crate::manifest::parse(data, ct) {
            let _ = crate::manifest::image_from_parts(
                "fuzz".into(),
                Digest::of(data),
                data.to_vec(),
                None,
                parsed,
                data.to_vec(),
            );
        }
    }
}

/// The tar indexer over an uncompressed layer (with a small size limit).
pub fn tar_index(data: &[u8]) {
    let limits = crate::index::Limits {
        max_uncompressed: 64 << 20,
        ..crate::index::Limits::default()
    };
    let _ = crate::index::build(data, limits, |_, _, r| {
        std::io::copy(r, &mut std::io::sink())
            .map(|_| ())
            .map_err(|e| crate::error::Error::malformed("fuzz", e))
    });
}

/// The cached/published index decoder, and a tree merged from what it accepts. The fuzzer
/// cannot guess digests or make zstd frames, so the first byte picks: odd, the rest is the
/// postcard payload (wrapped here into a well-formed file); even, the rest is the whole file
/// (its layer digest and checksum fixed up).
pub fn index_decode(data: &[u8]) {
    use sha2::Digest as _;
    let layer = Digest::of(b"fuzz layer");
    let raw_layer = hex::decode(layer.hex()).expect("hex");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 1 {
        crate::index::codec::frame(&layer, rest)
    } else {
        let mut b = rest.to_vec();
        if b.len() >= 76 {
            b[12..44].copy_from_slice(&raw_layer);
            let sum = sha2::Sha256::digest(&b[76..]);
            b[44..76].copy_from_slice(&sum);
        }
        b
    };
    if let Ok(idx) = crate::index::codec::decode(&layer, &bytes) {
        let _ = crate::tree::merge(&[&idx], &[]);
    }
}

/// The eStargz TOC reader.
pub fn estargz_toc(data: &[u8]) {
    let _ = crate::layer::estargz::parse_toc(data, 1 << 20);
    let _ = crate::layer::estargz::parse_footer(data);
    let _ = crate::layer::estargz::toc_json(data);
}

/// Index-artifact manifests (the seeds' subject, so that the fuzzer gets past that check).
pub fn artifact(data: &[u8]) {
    let subject = Digest::parse(&format!("sha256:{}", "b".repeat(64))).expect("a digest");
    let _ = crate::artifact::parse_manifest(data, &subject);
}
