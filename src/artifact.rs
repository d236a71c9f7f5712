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

/// `artifactType` of an index artifact (the layout of the artifact, not of each index).
pub const ARTIFACT_TYPE: &str = "application/vnd.imgfs.index.v1";
/// Annotation on each index blob's descriptor: the layer digest it describes.
pub const LAYER_ANNOTATION: &str = "dev.imgfs.layer.digest";
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

/// The artifact manifest for `indexes` (layer digest, index blob digest, blob size), in the
/// order given. Deterministic: the same indexes give the same digest, so pushing twice
/// changes nothing.
pub fn build_manifest(subject: &Descriptor, indexes: &[(Digest, Digest, u64)]) -> Vec<u8> {
    build_manifest_with_profile(subject, indexes, None)
}

/// [`build_manifest`] with an access profile blob (digest, size) after the indexes.
pub fn build_manifest_with_profile(
    subject: &Descriptor,
    indexes: &[(Digest, Digest, u64)],
    profile: Option<(Digest, u64)>,
) -> Vec<u8> {
    let mut layers: Vec<Descriptor> = indexes
        .iter()
        .map(|(layer, blob, size)| {
            let mut d = plain_descriptor(&index_media_type(), blob.clone(), *size);
            d.annotations
                .insert(LAYER_ANNOTATION.to_string(), layer.to_string());
            d
        })
        .collect();
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

/// The index blobs an artifact manifest offers, by the layer each describes. Blobs of another
/// index version are left out (an imgfs that reads that version will use them).
pub fn parse_manifest(bytes: &[u8], subject: &Digest) -> Result<BTreeMap<Digest, Descriptor>> {
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
    let wanted = index_media_type();
    let mut out = BTreeMap::new();
    for d in m.layers.into_iter().filter(|d| d.media_type == wanted) {
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
        out.insert(layer, d);
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

/// Refuse an index that cannot describe `layer`: one whose seek points lie past the blob's
/// end (a forged index could otherwise send range reads anywhere), or a gzip/zstd layer's
/// index without seek points.
fn check_fits(index: &LayerIndex, layer: &Layer) -> std::result::Result<(), String> {
    let size = layer.descriptor.size;
    let seek = index
        .seek
        .as_ref()
        .ok_or_else(|| "it has no seek points".to_string())?;
    if let Some(c) = seek.checkpoints.iter().find(|c| c.in_offset > size) {
        return Err(format!(
            "a seek point at byte {} of a {size}-byte layer",
            c.in_offset
        ));
    }
    if layer.compression == Compression::None
        && let Some(e) = index
            .entries
            .iter()
            .find(|e| e.offset.saturating_add(e.size) > size)
    {
        return Err(format!("{} ends past the layer's end", e.path));
    }
    Ok(())
}

/// Look for an index artifact of `image` and store, for each of `wanted`, the index it
/// offers, checked; with `want_profile`, the access profile of the newest artifact that has
/// one too. Returns how many indexes were stored. Never fails: anything wrong is logged
/// (naming the artifact and what was wrong) and the layer is indexed locally instead.
pub async fn fetch_indexes(
    cache: &Cache,
    src: &Source,
    image: &Image,
    wanted: &[&Layer],
    want_profile: bool,
) -> usize {
    let Source::Registry { client, reference } = src else {
        return 0;
    };
    let at = Repo {
        client,
        registry: &reference.registry,
        repo: &reference.repository,
    };
    let subject = &image.manifest_digest;
    let t = std::time::Instant::now();
    let candidates = find_artifacts(&at, subject).await;
    if candidates.is_empty() {
        tracing::debug!("no index artifact for {subject} ({:.1?})", t.elapsed());
        return 0;
    }
    let mut missing: Vec<&Layer> = wanted.to_vec();
    let mut stored = 0;
    // The newest profile among the artifacts looked at goes with the indexes.
    let mut profile_done = !want_profile;
    for artifact in candidates {
        if missing.is_empty() && profile_done {
            break;
        }
        let (digests, had_profile) =
            store_offered(cache, &at, subject, &artifact, &missing, !profile_done).await;
        for digest in digests {
            stored += 1;
            missing.retain(|l| l.descriptor.digest != digest);
        }
        profile_done |= had_profile;
    }
    tracing::info!(
        "{stored} layer index(es) of {subject} from the registry in {:.1?}",
        t.elapsed()
    );
    stored
}

/// The repository an image's index artifacts are looked for in.
struct Repo<'a> {
    client: &'a crate::registry::Client,
    registry: &'a str,
    repo: &'a str,
}

/// The index artifacts of `subject`, as the referrers API lists them or, on a registry
/// without one, the fallback tag names. A failure is logged and finds none: the layers are
/// then indexed here.
async fn find_artifacts(at: &Repo<'_>, subject: &Digest) -> Vec<Digest> {
    let Repo {
        client,
        registry,
        repo,
    } = *at;
    let list = match client
        .get_referrers(registry, repo, subject, ARTIFACT_TYPE)
        .await
    {
        Ok(Some(list)) => Some(list),
        Ok(None) => match client
            .get_manifest(registry, repo, &fallback_tag(subject))
            .await
        {
            Ok(m) => Some(m.bytes),
            Err(Error::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!("looking for an index artifact of {subject}: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("looking for an index artifact of {subject}: {e}");
            None
        }
    };
    match list.as_deref().map(candidates) {
        None => Vec::new(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::warn!("referrers of {subject}: {e}");
            Vec::new()
        }
    }
}

/// Fetch the access profile blob `blob` and keep it for image `subject`, if it parses.
async fn store_profile(
    cache: &Cache,
    at: &Repo<'_>,
    subject: &Digest,
    blob: &Descriptor,
) -> Result<()> {
    let bytes = at
        .client
        .get_blob_bytes(
            at.registry,
            at.repo,
            &blob.digest,
            crate::profile::MAX_BYTES,
        )
        .await?;
    crate::profile::Profile::parse(&bytes)?;
    cache.store_published_profile(subject, &bytes)
}

/// Store the indexes that `artifact` offers for layers of `missing`, checked, a few at once,
/// and with `want_profile` its access profile, alongside them (a round trip less than
/// after them). Returns the digests of the layers whose index was stored (each refusal is
/// logged), and whether the artifact offered a profile.
async fn store_offered(
    cache: &Cache,
    at: &Repo<'_>,
    subject: &Digest,
    artifact: &Digest,
    missing: &[&Layer],
    want_profile: bool,
) -> (Vec<Digest>, bool) {
    let Repo {
        client,
        registry,
        repo,
    } = *at;
    let offered = match client.get_manifest(registry, repo, artifact.as_str()).await {
        Ok(m) => parse_manifest(&m.bytes, subject).map(|o| (o, offered_profile(&m.bytes))),
        Err(e) => Err(e),
    };
    let (offered, profile) = match offered {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("index artifact {artifact} of {subject} not used: {e}");
            return (Vec::new(), false);
        }
    };
    // Collected, not chained: a stream holding closures over borrowed layers makes this
    // future too particular about lifetimes to be spawned (the layer store spawns it).
    let jobs: Vec<(Layer, Descriptor)> = missing
        .iter()
        .filter_map(|l| {
            let blob = offered.get(&l.descriptor.digest)?;
            Some(((*l).clone(), blob.clone()))
        })
        .collect();
    let had_profile = profile.is_some();
    let profile = async {
        let Some(p) = profile.filter(|_| want_profile) else {
            return;
        };
        if let Err(e) = store_profile(cache, at, subject, &p).await {
            tracing::warn!(
                "access profile {} of artifact {artifact} not used: {e}",
                p.digest
            );
        }
    };
    let indexes = futures_util::stream::iter(jobs)
        .map(|(layer, blob)| async move {
            let digest = layer.descriptor.digest.clone();
            let ok = match fetch_one(cache, client, registry, repo, &layer, &blob).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "index of layer {digest} from artifact {artifact} refused \
                             ({e}); indexing the layer here instead"
                    );
                    false
                }
            };
            (digest, ok)
        })
        .buffer_unordered(JOBS)
        .collect::<Vec<(Digest, bool)>>();
    let (results, ()) = futures_util::join!(indexes, profile);
    let stored = results
        .into_iter()
        .filter_map(|(digest, ok)| ok.then_some(digest))
        .collect();
    (stored, had_profile)
}

async fn fetch_one(
    cache: &Cache,
    client: &crate::registry::Client,
    registry: &str,
    repo: &str,
    layer: &Layer,
    blob: &Descriptor,
) -> Result<()> {
    let bytes = client
        .get_blob_bytes(registry, repo, &blob.digest, MAX_INDEX_BYTES)
        .await?;
    let digest = layer.descriptor.digest.clone();
    let layer = layer.clone();
    let cache = cache.clone();
    // Decoding a big index takes milliseconds of CPU: off the async threads.
    tokio::task::spawn_blocking(move || {
        let index = codec::decode(&digest, &bytes)?;
        check_fits(&index, &layer).map_err(|r| Error::malformed("layer index", r))?;
        cache.store_published_index(&digest, &bytes)
    })
    .await
    .map_err(|e| Error::Io {
        context: "a decoding thread failed".into(),
        cause: std::io::Error::other(e.to_string()),
    })?
}

/// What [`push`] did.
#[derive(Debug)]
pub struct Pushed {
    pub artifact: Digest,
    pub artifact_size: u64,
    /// Layers with an index in the artifact.
    pub indexes: usize,
    /// Their total size.
    pub index_bytes: u64,
    /// eStargz layers, which need none (their TOC is their index).
    pub skipped_estargz: usize,
    /// The registry had no referrers API and the `sha256-<hex>` tag was written.
    pub tag_updated: bool,
    /// The access profile pushed with the indexes: its reads, and how many of them name a
    /// layer of this image.
    pub profile: Option<(usize, usize)>,
}

/// Push the cached indexes of every layer of `image` (they must exist: build them first) as
/// an index artifact referring to the image manifest, with `profile` if given. Blobs the
/// repository has are not sent again, so a layer shared by many images has one index blob.
pub async fn push(
    cache: &Cache,
    src: &Source,
    image: &Image,
    profile: Option<&crate::profile::Profile>,
) -> Result<Pushed> {
    let Source::Registry { client, reference } = src else {
        return Err(Error::Unsupported {
            what: "index push target".into(),
            value: format!("{} is not in a registry", src.name()),
        });
    };
    let (registry, repo) = (&reference.registry, &reference.repository);
    let mut indexes = Vec::new();
    let mut skipped_estargz = 0;
    let mut index_bytes = 0;
    for layer in image.unique_layers() {
        let digest = &layer.descriptor.digest;
        if crate::layer::format::toc_format(layer.compression, &layer.descriptor.annotations)
            .is_some()
        {
            skipped_estargz += 1;
            continue;
        }
        let bytes = cache
            .load_index_bytes(digest)
            .ok_or_else(|| Error::NotFound {
                what: "layer index".into(),
                detail: format!("of {digest} in the cache (run `imgfs index build` first)"),
            })?;
        index_bytes += bytes.len() as u64;
        let size = bytes.len() as u64;
        let blob = client.push_blob(registry, repo, Bytes::from(bytes)).await?;
        indexes.push((digest.clone(), blob, size));
    }
    let mut profile_blob = None;
    let mut profile_counts = None;
    if let Some(p) = profile {
        let bytes = p.to_bytes();
        let size = bytes.len() as u64;
        let blob = client.push_blob(registry, repo, Bytes::from(bytes)).await?;
        profile_blob = Some((blob, size));
        let ours: std::collections::HashSet<&Digest> =
            image.layers.iter().map(|l| &l.descriptor.digest).collect();
        let fitting = p
            .reads
            .iter()
            .filter(|(l, _)| p.layers.get(*l as usize).is_some_and(|d| ours.contains(d)))
            .count();
        profile_counts = Some((p.reads.len(), fitting));
    }
    client
        .push_blob(registry, repo, Bytes::from_static(EMPTY_JSON))
        .await?;
    let subject = subject_of(image);
    let manifest = build_manifest_with_profile(&subject, &indexes, profile_blob);
    let artifact_size = manifest.len() as u64;
    let (artifact, subject_seen) = client
        .push_referrer(
            registry,
            repo,
            media::OCI_MANIFEST,
            Bytes::from(manifest),
            &subject.digest,
        )
        .await?;
    let mut tag_updated = false;
    if !subject_seen {
        // OCI distribution 1.1: without the referrers API, the client keeps the list in the
        // `sha256-<hex>` tag (read, add, write back; a concurrent pusher can lose an entry,
        // as with every client that follows this part of the spec).
        let tag = fallback_tag(&subject.digest);
        let existing = match client.get_manifest(registry, repo, &tag).await {
            Ok(m) => Some(m.bytes),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let entry = Referrer {
            media_type: media::OCI_MANIFEST.to_string(),
            digest: artifact.clone(),
            size: artifact_size,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
        };
        if let Some(list) = add_referrer(existing.as_deref(), &entry)? {
            client
                .push_manifest(registry, repo, &tag, media::OCI_INDEX, Bytes::from(list))
                .await?;
            tag_updated = true;
        }
    }
    Ok(Pushed {
        artifact,
        artifact_size,
        indexes: indexes.len(),
        index_bytes,
        skipped_estargz,
        tag_updated,
        profile: profile_counts,
    })
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
        assert_eq!(back[&d(b"l2")].digest, d(b"i2"));
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
