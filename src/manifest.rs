//! Manifests of every format a registry or layout may hold, reduced to one [`Image`].
//!
//! Raw manifest and config bytes are kept exactly as received: re-encoding JSON changes the
//! digest. Parsing reads only the fields imgfs needs, tolerating the rest.
//!
//! One file per concept: `media` (media types), `descriptor`, `platform`, `compression`,
//! `parse` (every manifest kind into [`Parsed`]), `verify` (the digest that names a manifest),
//! `select` (an index entry for a platform), `config` (what imgfs reads of a config); this
//! file assembles the single-platform [`Image`] from them.

mod compression;
mod config;
mod descriptor;
pub mod media;
mod parse;
mod platform;
mod select;
mod verify;

pub use compression::Compression;
pub use config::{ConfigProbe, RootFs};
pub use descriptor::Descriptor;
pub use parse::{MAX_LAYERS, Parsed, parse};
pub use platform::Platform;
pub use select::select_platform;
pub use verify::{manifest_digest, verify_manifest};

use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};

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

impl Layer {
    /// The layer a manifest's descriptor names, before the config is read (so with no
    /// diff_id): enough to look for its index while the config is fetched. `None` for a
    /// media type imgfs does not read (resolving the image then fails on it).
    pub fn from_manifest(descriptor: &Descriptor) -> Option<Layer> {
        Some(Layer {
            compression: Compression::from_media_type(&descriptor.media_type)?,
            descriptor: descriptor.clone(),
            diff_id: None,
        })
    }
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
