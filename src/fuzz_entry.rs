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
    ("merge_agreement", merge_agreement),
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

/// Layer stacks made from the bytes (a few names, every entry kind, links up, down and
/// across): the single-path merge that `cat` uses must find, for every path, what the full
/// merge (`ls`, mount, `pull`) finds, whenever it answers at all.
pub fn merge_agreement(data: &[u8]) {
    use crate::index::LayerIndex;
    let (layers, mut probes) = fuzz_layers(data);
    let refs: Vec<&LayerIndex> = layers.iter().collect();
    let Ok(full) = crate::tree::merge(&refs, &[]) else {
        return;
    };
    for n in NAMES {
        probes.push(n.to_string());
    }
    let what = |t: &crate::tree::Tree, p: &str| {
        t.lookup(p.as_bytes()).map(|d| {
            let i = t.inode_of(d);
            (i.meta.kind, i.meta.link.clone(), i.data)
        })
    };
    for p in &probes {
        let Some(alone) = crate::tree::merge_for_path(&refs, &[], p.as_bytes()) else {
            continue;
        };
        let alone = alone.unwrap_or_else(|e| panic!("{p}: the full merge worked, alone: {e}"));
        assert_eq!(
            what(&alone, p),
            what(&full, p),
            "{p:?} differs merged alone and in full: {layers:#?}"
        );
    }
}

/// The names [`merge_agreement`]'s paths are made of: few, so that layers meet.
const NAMES: [&str; 4] = ["a", "b", "c", "a/b"];

/// Up to 4 layers of up to 8 entries each, drawn from `data` until it runs out, and the
/// path of every entry (to probe).
fn fuzz_layers(data: &[u8]) -> (Vec<crate::index::LayerIndex>, Vec<String>) {
    use crate::index::LayerIndex;
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let mut layers: Vec<LayerIndex> = Vec::new();
    let mut probes: Vec<String> = Vec::new();
    'outer: while layers.len() < 4 {
        let Some(count) = next() else { break };
        let mut entries = Vec::new();
        for _ in 0..count % 8 + 1 {
            let Some((path, entry)) = fuzz_entry(&mut next) else {
                layers.push(LayerIndex {
                    entries,
                    seek: None,
                });
                break 'outer;
            };
            probes.push(path);
            entries.push(entry);
        }
        layers.push(LayerIndex {
            entries,
            seek: None,
        });
    }
    (layers, probes)
}

/// One entry of any kind drawn from the bytes `next` gives, with its path; `None` when they
/// run out first.
fn fuzz_entry(next: &mut dyn FnMut() -> Option<u8>) -> Option<(String, crate::index::Entry)> {
    use crate::index::{Entry, Kind};
    use bstr::BString;
    let (Some(k), Some(path)) = (next(), fuzz_path(next)) else {
        return None;
    };
    let kind = [
        Kind::Dir,
        Kind::File,
        Kind::Symlink,
        Kind::Hardlink,
        Kind::Whiteout,
        Kind::Opaque,
    ][(k % 6) as usize];
    let link = match kind {
        Kind::Symlink => {
            let t = match next().unwrap_or(0) % 4 {
                0 => NAMES[(next().unwrap_or(0) % 4) as usize].to_string(),
                1 => format!("/{}", NAMES[(next().unwrap_or(0) % 4) as usize]),
                2 => format!("../{}", NAMES[(next().unwrap_or(0) % 4) as usize]),
                _ => ".".to_string(),
            };
            Some(BString::from(t))
        }
        Kind::Hardlink => Some(BString::from(fuzz_path(next).unwrap_or_default())),
        _ => None,
    };
    let entry = Entry {
        path: path.clone().into(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        link,
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        offset: 0,
        sparse: Vec::new(),
    };
    Some((path, entry))
}

/// A path of 1 to 3 of the first three [`NAMES`] drawn from the bytes `n` gives.
fn fuzz_path(n: &mut dyn FnMut() -> Option<u8>) -> Option<String> {
    let depth = n()? % 3 + 1;
    let mut parts = Vec::new();
    for _ in 0..depth {
        parts.push(NAMES[(n()? % 3) as usize]);
    }
    Some(parts.join("/"))
}
