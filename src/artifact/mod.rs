//! Layer indexes published in the registry next to the image they describe, so that a machine
//! that never streamed a layer can mount it at once and read it by range: the registry (and
//! its mirrors) distributes what one machine learned by indexing.
//!
//! An index artifact is an OCI 1.1 image manifest with `artifactType` [`ARTIFACT_TYPE`], the
//! empty config, one "layer" per indexed image layer — the bytes of `index::codec`, which
//! name the layer they describe, annotated with that layer's digest too — and a `subject`
//! pointing at the image manifest. It is found through the referrers API or, on registries
//! without one (distribution 2.x, Debian's docker-registry), the `sha256-<hex>` tag. The
//! format is written down for other producers in docs/index-artifact.md. An artifact may
//! also carry an access profile (`crate::profile`), fetched and cached with the indexes.
//!
//! Trust: an artifact is not covered by the image's digest. Its manifest and blobs are
//! verified against their digests, each index must name the layer it is used for and fit
//! that layer's size, and every range read is checked against the index's span digests —
//! but the index itself is believed as much as anyone who can push to the repository.
//! `--no-remote-index` opts out.
//!
//! This file holds the format (building and parsing artifact manifests, the referrers list);
//! `fetch.rs` finds and fetches what a view needs, `push.rs` publishes.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::index::{LayerIndex, codec};
use crate::manifest::{Compression, Descriptor, Image, Layer, media};
use crate::source::Source;

mod fetch;
mod push;

pub use fetch::fetch_indexes;
pub use push::{Pushed, push};

/// `artifactType` of an index artifact (the layout of the artifact, not of each index).
pub const ARTIFACT_TYPE: &str = "application/vnd.imgfs.index.v1";
/// Annotation on each index blob's descriptor: the layer digest it describes.
pub const LAYER_ANNOTATION: &str = "dev.imgfs.layer.digest";
/// Media type of the windows blob a slim index's windows are in (`index::windows`).
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.imgfs.layer-windows.v1";
/// OCI's empty JSON config.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
/// A layer index is small (71 bytes an entry, plus 32 KiB windows every 4 MiB compressed
/// into the payload); one larger than this is not one.
const MAX_INDEX_BYTES: usize = 256 << 20;
/// Index artifacts examined per image, newest first.
const MAX_CANDIDATES: usize = 8;
/// Index blobs fetched at once.
const JOBS: usize = 4;

/// The media type of an index blob: the codec version is in it, so that an imgfs that reads
/// another version passes the blob over instead of failing on it.
pub fn index_media_type() -> String {
    format!("application/vnd.imgfs.layer-index.v{}", codec::VERSION)
}

/// The media type of a slim index blob (`index::windows`: each window replaced by its
/// digest, the windows in a blob of their own beside it).
pub fn slim_index_media_type() -> String {
    format!("application/vnd.imgfs.layer-index-slim.v{}", codec::VERSION)
}

/// One layer's index in an artifact: the index blob (digest, size), and for a slim one the
/// windows blob.
#[derive(Clone, Debug)]
pub struct IndexBlobs {
    pub layer: Digest,
    pub index: (Digest, u64),
    pub windows: Option<(Digest, u64)>,
}

/// What an artifact offers for one layer: an index blob, and for a slim one its windows.
#[derive(Clone, Debug)]
pub struct Offered {
    pub index: Descriptor,
    pub windows: Option<Descriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest {
    schema_version: u32,
    media_type: String,
    artifact_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
    subject: Descriptor,
}

/// One entry of a referrers list (an OCI index).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Referrer {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct ReferrersList {
    #[serde(default)]
    manifests: Vec<serde_json::Value>,
}

/// The tag that stands in for the referrers API: `sha256-<hex>` of the subject.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The subject descriptor of `image`: its (platform) manifest.
fn subject_of(image: &Image) -> Descriptor {
    Descriptor {
        media_type: image.manifest_media_type.clone(),
        digest: image.manifest_digest.clone(),
        size: image.raw_manifest.len() as u64,
        urls: Vec::new(),
        annotations: BTreeMap::new(),
        platform: None,
        size_unknown: false,
    }
}

fn plain_descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest,
        size,
        urls: Vec::new(),
        annotations: BTreeMap::new(),
        platform: None,
        size_unknown: false,
    }
}

/// The descriptor of a windows blob (`index::windows`), for reading it by range.
pub fn windows_descriptor(blob: &Digest, size: u64) -> Descriptor {
    plain_descriptor(WINDOWS_MEDIA_TYPE, blob.clone(), size)
}

/// The artifact manifest for `indexes` (layer digest, index blob digest, blob size), in the
/// order given. Deterministic: the same indexes give the same digest, so pushing twice
/// changes nothing.
pub fn build_manifest(subject: &Descriptor, indexes: &[(Digest, Digest, u64)]) -> Vec<u8> {
    let blobs: Vec<IndexBlobs> = indexes
        .iter()
        .map(|(layer, blob, size)| IndexBlobs {
            layer: layer.clone(),
            index: (blob.clone(), *size),
            windows: None,
        })
        .collect();
    build_manifest_with(subject, &blobs, None)
}

/// [`build_manifest`] for full or slim indexes, with an access profile blob (digest, size)
/// after them.
pub fn build_manifest_with(
    subject: &Descriptor,
    indexes: &[IndexBlobs],
    profile: Option<(Digest, u64)>,
) -> Vec<u8> {
    let of_layer = |media_type: &str, (blob, size): &(Digest, u64), layer: &Digest| {
        let mut d = plain_descriptor(media_type, blob.clone(), *size);
        d.annotations
            .insert(LAYER_ANNOTATION.to_string(), layer.to_string());
        d
    };
    let mut layers: Vec<Descriptor> = Vec::new();
    for i in indexes {
        match &i.windows {
            None => layers.push(of_layer(&index_media_type(), &i.index, &i.layer)),
            Some(w) => {
                layers.push(of_layer(&slim_index_media_type(), &i.index, &i.layer));
                layers.push(of_layer(WINDOWS_MEDIA_TYPE, w, &i.layer));
            }
        }
    }
    if let Some((blob, size)) = profile {
        layers.push(plain_descriptor(crate::profile::MEDIA_TYPE, blob, size));
    }
    let m = ArtifactManifest {
        schema_version: 2,
        media_type: media::OCI_MANIFEST.to_string(),
        artifact_type: ARTIFACT_TYPE.to_string(),
        config: plain_descriptor(
            EMPTY_MEDIA_TYPE,
            Digest::of(EMPTY_JSON),
            EMPTY_JSON.len() as u64,
        ),
        layers,
        subject: subject.clone(),
    };
    serde_json::to_vec(&m).expect("serialising to memory cannot fail")
}

/// The index blobs an artifact manifest offers, by the layer each describes: a slim index
/// with its windows blob where both are there, else a full one. Blobs of another index
/// version are left out (an imgfs that reads that version will use them).
pub fn parse_manifest(bytes: &[u8], subject: &Digest) -> Result<BTreeMap<Digest, Offered>> {
    let bad = |reason: String| Error::malformed("index artifact", reason);
    let m: ArtifactManifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not an artifact manifest: {e}")))?;
    if m.artifact_type != ARTIFACT_TYPE {
        return Err(bad(format!("artifactType is {:?}", m.artifact_type)));
    }
    if &m.subject.digest != subject {
        return Err(bad(format!(
            "it refers to {}, not to {subject}",
            m.subject.digest
        )));
    }
    let (full, slim) = (index_media_type(), slim_index_media_type());
    let mut found: BTreeMap<(Digest, &str), Descriptor> = BTreeMap::new();
    for d in m.layers.into_iter() {
        let kind = match d.media_type.as_str() {
            t if t == full => "full",
            t if t == slim => "slim",
            WINDOWS_MEDIA_TYPE => "windows",
            _ => continue,
        };
        let layer = d
            .annotations
            .get(LAYER_ANNOTATION)
            .ok_or_else(|| bad(format!("index blob {} names no layer", d.digest)))?;
        let layer = Digest::parse(layer)
            .map_err(|_| bad(format!("{LAYER_ANNOTATION} is not a digest: {layer:?}")))?;
        if d.size > MAX_INDEX_BYTES as u64 {
            return Err(bad(format!(
                "index blob {} claims {} bytes",
                d.digest, d.size
            )));
        }
        found.insert((layer, kind), d);
    }
    let layers: std::collections::BTreeSet<Digest> = found.keys().map(|(l, _)| l.clone()).collect();
    let mut out = BTreeMap::new();
    for layer in layers {
        let slim = found.remove(&(layer.clone(), "slim"));
        let windows = found.remove(&(layer.clone(), "windows"));
        let offered = match (slim, windows) {
            (Some(index), Some(w)) => Offered {
                index,
                windows: Some(w),
            },
            _ => match found.remove(&(layer.clone(), "full")) {
                Some(index) => Offered {
                    index,
                    windows: None,
                },
                None => continue,
            },
        };
        out.insert(layer, offered);
    }
    Ok(out)
}

/// The access profile blob an artifact manifest offers, if any (the manifest was checked
/// by [`parse_manifest`]).
fn offered_profile(bytes: &[u8]) -> Option<Descriptor> {
    let m: ArtifactManifest = serde_json::from_slice(bytes).ok()?;
    m.layers
        .into_iter()
        .find(|d| d.media_type == crate::profile::MEDIA_TYPE)
        .filter(|d| d.size <= crate::profile::MAX_BYTES as u64)
}

/// The imgfs index artifacts in a referrers list, newest (listed last) first.
fn candidates(list: &[u8]) -> Result<Vec<Digest>> {
    let list: ReferrersList = serde_json::from_slice(list)
        .map_err(|e| Error::malformed("referrers list", e.to_string()))?;
    Ok(list
        .manifests
        .into_iter()
        .rev()
        .filter_map(|v| serde_json::from_value::<Referrer>(v).ok())
        .filter(|r| r.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
        .map(|r| r.digest)
        .take(MAX_CANDIDATES)
        .collect())
}

/// `list` (the fallback tag's index, if there is one) with `artifact` added; `None` if it
/// already lists it. Other entries are kept as they are, fields included: other tools share
/// this tag.
fn add_referrer(list: Option<&[u8]>, artifact: &Referrer) -> Result<Option<Vec<u8>>> {
    let mut doc: serde_json::Value = match list {
        Some(b) => serde_json::from_slice(b)
            .map_err(|e| Error::malformed("referrers tag", e.to_string()))?,
        None => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [],
        }),
    };
    let manifests = doc
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| Error::malformed("referrers tag", "no manifests list"))?;
    let digest = artifact.digest.to_string();
    if manifests
        .iter()
        .any(|m| m.get("digest").and_then(|d| d.as_str()) == Some(&digest))
    {
        return Ok(None);
    }
    manifests.push(serde_json::to_value(artifact).expect("a referrer is JSON"));
    Ok(Some(serde_json::to_vec(&doc).expect("JSON to memory")))
}

/// Each of `layers` (once) that could use a published index: not eStargz, and
/// with no index in the cache yet.
pub fn layers_wanting_index<'a>(cache: &Cache, layers: &'a [Layer]) -> Vec<&'a Layer> {
    let mut seen = std::collections::HashSet::new();
    layers
        .iter()
        .filter(|l| seen.insert(&l.descriptor.digest))
        .filter(|l| {
            crate::layer::format::toc_format(l.compression, &l.descriptor.annotations).is_none()
        })
        .filter(|l| {
            !cache.has_index(&l.descriptor.digest)
                && !cache.has_published_index(&l.descriptor.digest)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &[u8]) -> Digest {
        Digest::of(s)
    }

    #[test]
    fn a_built_manifest_parses_back_and_is_deterministic() {
        let subject = plain_descriptor(media::OCI_MANIFEST, d(b"image"), 123);
        let idx = vec![(d(b"l1"), d(b"i1"), 10), (d(b"l2"), d(b"i2"), 20)];
        let m = build_manifest(&subject, &idx);
        assert_eq!(m, build_manifest(&subject, &idx));
        let back = parse_manifest(&m, &d(b"image")).unwrap();
        assert_eq!(back[&d(b"l2")].index.digest, d(b"i2"));
        assert_eq!(back.len(), 2);
        let e = parse_manifest(&m, &d(b"other image"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not to"), "{e}");
    }

    #[test]
    fn blobs_of_another_index_version_are_passed_over() {
        let subject = plain_descriptor(media::OCI_MANIFEST, d(b"image"), 1);
        let m = build_manifest(&subject, &[(d(b"l"), d(b"i"), 1)]);
        let other = String::from_utf8(m).unwrap().replace(
            &index_media_type(),
            "application/vnd.imgfs.layer-index.v999",
        );
        assert!(
            parse_manifest(other.as_bytes(), &d(b"image"))
                .unwrap()
                .is_empty()
        );
        assert!(parse_manifest(b"{]", &d(b"image")).is_err());
    }

    #[test]
    fn the_referrers_tag_keeps_other_entries_and_lists_ours_once() {
        let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":5,"artifactType":"application/spdx+json","annotations":{"k":"v"}}]}"#;
        let ours = Referrer {
            media_type: media::OCI_MANIFEST.into(),
            digest: d(b"artifact"),
            size: 9,
            artifact_type: Some(ARTIFACT_TYPE.into()),
        };
        let list = add_referrer(Some(other), &ours).unwrap().unwrap();
        let text = String::from_utf8(list.clone()).unwrap();
        assert!(text.contains(r#""annotations":{"k":"v"}"#), "{text}");
        assert_eq!(candidates(&list).unwrap(), vec![d(b"artifact")]);
        assert!(add_referrer(Some(&list), &ours).unwrap().is_none());
        let fresh = add_referrer(None, &ours).unwrap().unwrap();
        assert_eq!(candidates(&fresh).unwrap(), vec![d(b"artifact")]);
    }
}
