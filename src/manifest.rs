//! Manifests of every format a registry or layout may hold, reduced to one [`Image`].
//!
//! Raw manifest and config bytes are kept exactly as received: re-encoding JSON changes the
//! digest. Parsing reads only the fields imgfs needs, tolerating the rest.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    pub const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

    /// Every manifest type imgfs understands, for the `Accept` header.
    pub const ACCEPT_MANIFESTS: &[&str] = &[
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_LIST,
        DOCKER_MANIFEST,
        SCHEMA1_SIGNED,
        SCHEMA1,
    ];
}

/// A content descriptor as OCI and Docker schema 2 both write it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Schema 1 records no sizes: `size` is then 0 and means "unknown" (and a fetch is capped
    /// instead). Everywhere else `size` is exact, 0 included.
    #[serde(skip)]
    pub size_unknown: bool,
}

/// An `os/arch[/variant]` triple.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parse `os/arch[/variant]`, as `--platform` takes it.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: parts
                    .get(2)
                    .filter(|v| !v.is_empty())
                    .map(|v| v.to_string()),
            }),
            _ => Err(Error::Unsupported {
                what: "platform (expected OS/ARCH[/VARIANT], e.g. linux/arm64)".into(),
                value: s.to_string(),
            }),
        }
    }

    /// The platform of the machine we run on, in Go's names (linux images even elsewhere).
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(str::to_string),
        }
    }

    /// The variant with defaults filled in: arm64 means v8 unless said otherwise.
    fn normalized_variant(&self) -> Option<&str> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            ("arm64", None) => Some("v8"),
            (_, v) => v,
        }
    }

    /// Does an image for `self` run where `wanted` is asked for?
    pub fn matches(&self, wanted: &Platform) -> bool {
        self.os == wanted.os
            && self.architecture == wanted.architecture
            && (wanted.variant.is_none()
                || self.normalized_variant() == wanted.normalized_variant())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type; `None` when the type is not a layer type we know.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        match mt {
            media::DOCKER_LAYER_TAR | media::OCI_LAYER_TAR => Some(Compression::None),
            media::DOCKER_LAYER_GZIP | media::OCI_LAYER_GZIP => Some(Compression::Gzip),
            media::OCI_LAYER_ZSTD => Some(Compression::Zstd),
            // Non-distributable ("foreign") variants carry the same compression suffixes.
            _ if mt.ends_with(".tar.gzip") || mt.ends_with("+gzip") => Some(Compression::Gzip),
            _ if mt.ends_with("+zstd") => Some(Compression::Zstd),
            _ if mt.ends_with(".tar") || mt.ends_with(".rootfs.diff.tar") => {
                Some(Compression::None)
            }
            _ => None,
        }
    }

    /// From the first bytes of a blob.
    pub fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// One layer of an image, bottom first.
#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    #[serde(flatten)]
    pub descriptor: Descriptor,
    pub compression: Compression,
    /// The digest of the uncompressed tar, from the config's `rootfs.diff_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
}

/// A resolved, single-platform image: what every command works from.
#[derive(Clone, Debug)]
pub struct Image {
    /// The reference as given, normalised.
    pub reference: String,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    /// The manifest exactly as received (for docker-archive: as imgfs synthesised it).
    pub raw_manifest: Vec<u8>,
    /// The index or manifest list this manifest was chosen from, if any.
    pub index_digest: Option<Digest>,
    pub config: Option<Descriptor>,
    /// The config exactly as received (for schema 1: the newest `v1Compatibility`).
    pub raw_config: Vec<u8>,
    pub platform: Platform,
    /// Layers in the order they apply, bottom first. A blob may appear twice; fetch it once.
    pub layers: Vec<Layer>,
}

impl Image {
    /// Each distinct layer blob once, in first-use order.
    pub fn unique_layers(&self) -> Vec<&Layer> {
        let mut seen = std::collections::HashSet::new();
        self.layers
            .iter()
            .filter(|l| seen.insert(&l.descriptor.digest))
            .collect()
    }
}

/// What a manifest document turned out to be.
#[derive(Debug)]
pub enum Parsed {
    /// An OCI index or Docker manifest list.
    Index { manifests: Vec<Descriptor> },
    /// An OCI or Docker schema 2 image manifest.
    Image {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    /// A Docker schema 1 manifest, already in apply order with duplicates dropped.
    Schema1 {
        media_type: String,
        layers: Vec<Descriptor>,
        /// The newest `v1Compatibility` JSON: schema 1's stand-in for a config.
        config: Vec<u8>,
        architecture: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    fs_layers: Option<Vec<FsLayer>>,
    #[serde(default)]
    history: Option<Vec<V1History>>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    signatures: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FsLayer {
    blob_sum: Digest,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V1History {
    v1_compatibility: String,
}

#[derive(Deserialize)]
struct V1Compat {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    throwaway: bool,
}

/// Parse a manifest document. `content_type` is the registry's `Content-Type` (or the
/// descriptor's media type), used when the document does not say what it is.
pub fn parse(raw: &[u8], content_type: Option<&str>) -> Result<Parsed> {
    let parsed = parse_any(raw, content_type)?;
    if let Parsed::Image { layers, .. } = &parsed
        && layers.len() > MAX_LAYERS
    {
        return Err(Error::malformed(
            "manifest",
            format!(
                "it lists {} layers; imgfs handles at most {MAX_LAYERS}",
                layers.len()
            ),
        ));
    }
    Ok(parsed)
}

/// The most layers an image may have. Docker and containerd stop at 127 (overlayfs's
/// depth); far more is a hostile manifest, each layer costing a fetch, an index and a merge.
pub const MAX_LAYERS: usize = 1000;

fn parse_any(raw: &[u8], content_type: Option<&str>) -> Result<Parsed> {
    let bad = |reason: String| Error::malformed("manifest", reason);
    let p: Probe = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
    let declared = p
        .media_type
        .clone()
        .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_string()))
        .filter(|m| !m.is_empty() && m != "application/json" && m != "text/plain");

    let kind = match declared.as_deref() {
        Some(media::OCI_INDEX | media::DOCKER_LIST) => "index",
        Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST) => "image",
        Some(media::SCHEMA1 | media::SCHEMA1_SIGNED) => "schema1",
        Some(other) if p.manifests.is_none() && p.layers.is_none() && p.fs_layers.is_none() => {
            return Err(Error::Unsupported {
                what: "manifest media type".into(),
                value: other.to_string(),
            });
        }
        // Undeclared: go by shape, as the OCI spec allows.
        _ if p.manifests.is_some() => "index",
        _ if p.fs_layers.is_some() || p.schema_version == Some(1) => "schema1",
        _ if p.layers.is_some() || p.config.is_some() => "image",
        _ => return Err(bad("neither an image manifest nor an index".into())),
    };
    match kind {
        "index" => Ok(Parsed::Index {
            manifests: p
                .manifests
                .ok_or_else(|| bad("index has no \"manifests\"".into()))?,
        }),
        "image" => {
            if p.schema_version != Some(2) {
                return Err(bad(format!(
                    "schemaVersion is {:?}, expected 2",
                    p.schema_version
                )));
            }
            Ok(Parsed::Image {
                media_type: declared.unwrap_or_else(|| media::OCI_MANIFEST.to_string()),
                config: p
                    .config
                    .ok_or_else(|| bad("image manifest has no \"config\"".into()))?,
                layers: p.layers.unwrap_or_default(),
            })
        }
        _ => parse_schema1(p, declared, raw),
    }
}

fn parse_schema1(p: Probe, declared: Option<String>, raw: &[u8]) -> Result<Parsed> {
    let bad = |reason: &str| Error::malformed("schema 1 manifest", reason);
    let fs_layers = p.fs_layers.ok_or_else(|| bad("no \"fsLayers\""))?;
    let history = p.history.ok_or_else(|| bad("no \"history\""))?;
    if fs_layers.len() != history.len() {
        return Err(bad("\"fsLayers\" and \"history\" differ in length"));
    }
    if fs_layers.is_empty() {
        return Err(bad("no layers"));
    }
    // Newest first in the document; apply oldest first. Like Docker's schema 1 puller, skip
    // throwaway (empty) layers and a layer whose v1 id repeats the one below it.
    let mut layers = Vec::new();
    let mut last_id: Option<String> = None;
    for (fs, h) in fs_layers.iter().zip(&history).rev() {
        let compat: V1Compat = serde_json::from_str(&h.v1_compatibility)
            .map_err(|e| bad(&format!("v1Compatibility is not JSON: {e}")))?;
        if compat.throwaway || (compat.id.is_some() && compat.id == last_id) {
            continue;
        }
        last_id = compat.id;
        layers.push(Descriptor {
            media_type: media::DOCKER_LAYER_GZIP.to_string(),
            digest: fs.blob_sum.clone(),
            size: 0,
            urls: vec![],
            annotations: BTreeMap::new(),
            platform: None,
            size_unknown: true,
        });
    }
    let media_type = declared.unwrap_or_else(|| {
        if p.signatures.is_some() {
            media::SCHEMA1_SIGNED.to_string()
        } else {
            media::SCHEMA1.to_string()
        }
    });
    let _ = raw;
    Ok(Parsed::Schema1 {
        media_type,
        layers,
        config: history[0].v1_compatibility.as_bytes().to_vec(),
        architecture: p.architecture.unwrap_or_default(),
    })
}

/// The digest a registry gives a manifest. For a signed schema 1 manifest that is the digest
/// of the payload without its signatures (the JWS "protected" header says how to cut it) —
/// but only when the received document *is* that payload plus its `signatures`: the cut is
/// chosen by the sender, so the payload must be a schema 1 manifest equal, as JSON, to what
/// will be parsed. Otherwise the digest is that of the bytes received.
pub fn manifest_digest(raw: &[u8]) -> Digest {
    schema1_payload(raw)
        .map(|p| Digest::of(&p))
        .unwrap_or_else(|| Digest::of(raw))
}

fn schema1_payload(raw: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Signed {
        signatures: Vec<Sig>,
    }
    #[derive(Deserialize)]
    struct Sig {
        protected: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Protected {
        format_length: usize,
        format_tail: String,
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed: Signed = serde_json::from_slice(raw).ok()?;
    let prot = b64
        .decode(signed.signatures.first()?.protected.trim_end_matches('='))
        .ok()?;
    let prot: Protected = serde_json::from_slice(&prot).ok()?;
    let tail = b64.decode(prot.format_tail.trim_end_matches('=')).ok()?;
    let mut payload = raw.get(..prot.format_length)?.to_vec();
    payload.extend_from_slice(&tail);
    let mut whole: serde_json::Value = serde_json::from_slice(raw).ok()?;
    whole.as_object_mut()?.remove("signatures")?;
    let cut: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    (whole == cut && cut.get("schemaVersion") == Some(&serde_json::json!(1))).then_some(payload)
}

/// Verify that `raw` is the manifest named by `digest`.
pub fn verify_manifest(digest: &Digest, raw: &[u8]) -> Result<()> {
    let actual = manifest_digest(raw);
    if &actual != digest {
        return Err(Error::DigestMismatch {
            what: "manifest".into(),
            expected: digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Pick the entry of an index for `wanted`. Attestation and other non-image entries
/// (platform `unknown/unknown`) are never chosen nor listed.
pub fn select_platform<'a>(
    reference: &str,
    manifests: &'a [Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor> {
    let images: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
        .collect();
    let candidates: Vec<&&Descriptor> = images
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.matches(wanted)))
        .collect();
    // Prefer an exact variant match when the user gave none (e.g. arm/v7 over arm/v6 on v7).
    let host_variant = Platform::host();
    let best = candidates
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                wanted.variant.is_some()
                    || p.normalized_variant() == host_variant.normalized_variant()
            })
        })
        .or(candidates.first());
    best.map(|d| **d).ok_or_else(|| Error::NoMatchingPlatform {
        reference: reference.to_string(),
        wanted: wanted.to_string(),
        available: offered_platforms(images.iter().filter_map(|d| d.platform.as_ref())),
    })
}

/// How many platforms a "no image for platform" error lists.
const OFFERED_MAX: usize = 20;

/// The distinct platforms an index offers, in its order, for an error message: at most
/// [`OFFERED_MAX`] and then "and N more" — an index of thousands of entries once made a
/// one-line error of 31 KB.
fn offered_platforms<'a>(platforms: impl Iterator<Item = &'a Platform>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<String> = platforms
        .map(|p| p.to_string())
        .filter(|p| seen.insert(p.clone()))
        .collect();
    let more = distinct.len().saturating_sub(OFFERED_MAX);
    let mut shown: Vec<String> = distinct.into_iter().take(OFFERED_MAX).collect();
    if more > 0 {
        shown.push(format!("and {more} more"));
    }
    shown
}

/// The fields of an image config imgfs reads.
#[derive(Deserialize, Default)]
pub struct ConfigProbe {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ConfigProbe {
    pub fn parse(raw: &[u8]) -> Result<ConfigProbe> {
        serde_json::from_slice(raw).map_err(|e| Error::malformed("image config", e))
    }
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// Assemble an [`Image`] from a parsed image manifest and its raw config.
pub fn image_from_parts(
    reference: String,
    manifest_digest: Digest,
    raw_manifest: Vec<u8>,
    index_digest: Option<Digest>,
    parsed: Parsed,
    raw_config: Vec<u8>,
) -> Result<Image> {
    match parsed {
        Parsed::Image {
            media_type,
            config,
            layers,
        } => {
            let probe = ConfigProbe::parse(&raw_config)?;
            let layers = schema2_layers(layers, &probe)?;
            Ok(Image {
                reference,
                manifest_digest,
                manifest_media_type: media_type,
                raw_manifest,
                index_digest,
                platform: probe.platform(),
                config: Some(config),
                raw_config,
                layers,
            })
        }
        Parsed::Schema1 {
            media_type,
            layers,
            config,
            architecture,
        } => Ok(Image {
            reference,
            manifest_digest,
            manifest_media_type: media_type,
            raw_manifest,
            index_digest,
            platform: schema1_platform(&config, architecture),
            config: None,
            raw_config: config,
            layers: layers
                .into_iter()
                .map(|d| Layer {
                    descriptor: d,
                    compression: Compression::Gzip,
                    diff_id: None,
                })
                .collect(),
        }),
        Parsed::Index { .. } => Err(Error::malformed(
            "image",
            "an index was given where an image manifest was expected",
        )),
    }
}

/// The layers of a schema 2 (or OCI) manifest, each with its compression (from its media
/// type, which must be one imgfs reads) and its diff_id from the config, whose list must
/// match the manifest's when it has one.
fn schema2_layers(layers: Vec<Descriptor>, probe: &ConfigProbe) -> Result<Vec<Layer>> {
    let diff_ids = probe.rootfs.as_ref().map(|r| r.diff_ids.clone());
    if let Some(ids) = &diff_ids
        && ids.len() != layers.len()
    {
        return Err(Error::malformed(
            "image",
            format!(
                "the manifest lists {} layers but the config has {} diff_ids",
                layers.len(),
                ids.len()
            ),
        ));
    }
    layers
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let compression =
                Compression::from_media_type(&d.media_type).ok_or_else(|| Error::Unsupported {
                    what: format!("layer media type (layer {})", d.digest),
                    value: d.media_type.clone(),
                })?;
            Ok(Layer {
                diff_id: diff_ids.as_ref().map(|ids| ids[i].clone()),
                descriptor: d,
                compression,
            })
        })
        .collect()
}

/// A schema 1 image's platform: its manifest names the architecture, its newest
/// `v1Compatibility` JSON (`config`) may name the OS; Linux when it does not.
fn schema1_platform(config: &[u8], architecture: String) -> Platform {
    Platform {
        os: ConfigProbe::parse(config)
            .map(|c| c.os)
            .ok()
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| "linux".into()),
        architecture,
        variant: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn platform_parse_and_match() {
        let p = Platform::parse("linux/arm64").unwrap();
        assert!(
            Platform::parse("linux/arm64/v8").unwrap().matches(&p),
            "arm64/v8 is what arm64 means"
        );
        assert!(p.matches(&Platform::parse("linux/arm64/v8").unwrap()));
        assert!(
            !Platform::parse("linux/arm/v6")
                .unwrap()
                .matches(&Platform::parse("linux/arm/v7").unwrap())
        );
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn index_selection_lists_available_platforms() {
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            d(1),
            media::OCI_MANIFEST,
            d(2),
            media::OCI_MANIFEST,
            d(3)
        );
        let Parsed::Index { manifests } = parse(raw.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let arm = select_platform("x", &manifests, &Platform::parse("linux/arm64").unwrap());
        assert_eq!(arm.unwrap().digest.to_string(), d(2));
        let err = select_platform("x", &manifests, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/s390x"), "{err}");
        assert!(err.contains("linux/amd64, linux/arm64/v8"), "{err}");
        assert!(!err.contains("unknown"), "{err}");
    }

    #[test]
    fn a_huge_index_lists_a_few_distinct_platforms() {
        // 2,000 entries over 50 platforms, each listed 40 times.
        let entries: Vec<String> = (0..2000)
            .map(|i| {
                format!(
                    r#"{{"mediaType":"{}","digest":"sha256:{i:064x}","size":1,"platform":{{"os":"linux","architecture":"arch{}"}}}}"#,
                    media::OCI_MANIFEST,
                    i % 50
                )
            })
            .collect();
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            media::OCI_INDEX,
            entries.join(",")
        );
        let Parsed::Index { manifests } = parse(raw.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let err = select_platform("x", &manifests, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.len() < 600, "{} bytes: {err}", err.len());
        assert!(err.contains("linux/arch0, linux/arch1, "), "{err}");
        assert!(err.contains("linux/arch19, and 30 more"), "{err}");
        assert!(!err.contains("linux/arch20"), "{err}");
    }

    #[test]
    fn schema1_apply_order_drops_throwaway_and_repeats() {
        let raw = format!(
            r#"{{"schemaVersion":1,"name":"a","tag":"t","architecture":"amd64",
            "fsLayers":[{{"blobSum":"{}"}},{{"blobSum":"{}"}},{{"blobSum":"{}"}},{{"blobSum":"{}"}}],
            "history":[{{"v1Compatibility":"{{\"id\":\"top\",\"os\":\"linux\"}}"}},
                       {{"v1Compatibility":"{{\"id\":\"empty\",\"throwaway\":true}}"}},
                       {{"v1Compatibility":"{{\"id\":\"base\"}}"}},
                       {{"v1Compatibility":"{{\"id\":\"base\"}}"}}]}}"#,
            d(3),
            d(9),
            d(1),
            d(1)
        );
        let Parsed::Schema1 { layers, config, .. } = parse(raw.as_bytes(), None).unwrap() else {
            panic!("not schema 1")
        };
        let got: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
        assert_eq!(got, vec![d(1), d(3)]);
        assert_eq!(config, br#"{"id":"top","os":"linux"}"#);
    }

    #[test]
    fn a_forged_signature_cut_cannot_make_one_manifest_pass_for_another() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let pinned = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
        let protected = serde_json::json!({
            "formatLength": 1,
            "formatTail": b64.encode(&pinned[1..]),
        });
        let forged = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":1}},"layers":[],"signatures":[{{"protected":"{}"}}]}}"#,
            d(9),
            b64.encode(protected.to_string())
        );
        let pinned_digest = Digest::of(pinned);
        assert!(verify_manifest(&pinned_digest, forged.as_bytes()).is_err());
        assert_eq!(
            manifest_digest(forged.as_bytes()),
            Digest::of(forged.as_bytes())
        );
    }

    #[test]
    fn malformed_manifests_are_named() {
        for (raw, want) in [
            (&b"not json"[..], "malformed manifest"),
            (
                &br#"{"schemaVersion":2}"#[..],
                "neither an image manifest nor an index",
            ),
            (
                &br#"{"schemaVersion":2,"mediaType":"application/x-thing"}"#[..],
                "application/x-thing",
            ),
            (
                &br#"{"schemaVersion":2,"layers":[{"digest":"sha256:zz","size":1}]}"#[..],
                "sha256:zz",
            ),
        ] {
            let e = parse(raw, None).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
