//! An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`), as written by
//! skopeo, umoci, buildah and `docker save` since 25.

use std::path::{Path, PathBuf};

use super::{BlobStream, file_range_stream, missing_blob};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Descriptor, Parsed, media};
use crate::registry::RawManifest;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

impl LayoutSource {
    pub async fn open(dir: &Path, tag: Option<String>) -> Result<LayoutSource> {
        let marker = dir.join("oci-layout");
        let text = tokio::fs::read(&marker)
            .await
            .map_err(|e| Error::NotFound {
                what: "OCI image layout".into(),
                detail: format!("{} has no readable oci-layout file ({e})", dir.display()),
            })?;
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            image_layout_version: String,
        }
        let m: Marker = serde_json::from_slice(&text)
            .map_err(|e| Error::malformed(format!("{}", marker.display()), e))?;
        if !m.image_layout_version.starts_with("1.") {
            return Err(Error::Unsupported {
                what: "OCI layout version".into(),
                value: m.image_layout_version,
            });
        }
        Ok(LayoutSource {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    pub fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// The manifest `index.json` points at for our tag; with no tag, its only manifest — or
    /// `index.json` itself when it lists one manifest per platform.
    pub async fn root_manifest(&self) -> Result<RawManifest> {
        let path = self.dir.join("index.json");
        let raw = tokio::fs::read(&path)
            .await
            .ctx(|| format!("reading {}", path.display()))?;
        let Parsed::Index { manifests } = manifest::parse(&raw, Some(media::OCI_INDEX))? else {
            return Err(Error::malformed(
                path.display().to_string(),
                "not an image index",
            ));
        };
        let tags = || {
            let t: Vec<&str> = manifests
                .iter()
                .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            if t.is_empty() {
                "none".to_string()
            } else {
                t.join(", ")
            }
        };
        let chosen = match &self.tag {
            Some(tag) => manifests
                .iter()
                .find(|m| m.annotations.get(REF_NAME) == Some(tag))
                .ok_or_else(|| Error::NotFound {
                    what: "tag".into(),
                    detail: format!("{tag:?} in {} (tags: {})", self.dir.display(), tags()),
                })?,
            None if manifests.len() == 1 => &manifests[0],
            None if !manifests.is_empty() && manifests.iter().all(|m| m.platform.is_some()) => {
                return Ok(RawManifest {
                    digest: Digest::of(&raw),
                    bytes: raw,
                    content_type: Some(media::OCI_INDEX.into()),
                });
            }
            None => {
                return Err(Error::NotFound {
                    what: "image".into(),
                    detail: format!(
                        "{} holds {} images; name one with oci:DIR:TAG (tags: {})",
                        self.dir.display(),
                        manifests.len(),
                        tags()
                    ),
                });
            }
        };
        self.manifest(chosen).await
    }

    /// Read and verify the manifest blob `d` names.
    pub async fn manifest(&self, d: &Descriptor) -> Result<RawManifest> {
        let path = self.blob_path(&d.digest);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|_| missing_blob(&self.name(), &d.digest))?;
        manifest::verify_manifest(&d.digest, &bytes)?;
        Ok(RawManifest {
            digest: d.digest.clone(),
            bytes,
            content_type: Some(d.media_type.clone()),
        })
    }

    pub async fn open_blob(&self, d: &Digest, offset: u64) -> Result<BlobStream> {
        let path = self.blob_path(d);
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|_| missing_blob(&self.name(), d))?
            .len();
        let mut s = file_range_stream(&path, offset, len.saturating_sub(offset))
            .await
            .ctx(|| format!("reading {}", path.display()))?;
        s.start = offset;
        Ok(s)
    }
}
