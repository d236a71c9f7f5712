//! Parsing a manifest document of any kind (OCI or Docker image manifest, OCI index or
//! Docker manifest list, Docker schema 1) into [`Parsed`]: by its declared media type, else
//! by its shape, as the OCI spec allows. Only the fields imgfs needs are read. Schema 1 is
//! turned into apply order here, as Docker's puller does it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::descriptor::Descriptor;
use super::media;
use crate::digest::Digest;
use crate::error::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
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
