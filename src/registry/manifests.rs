//! Manifests fetched by tag or digest, with every manifest type accepted, the bytes kept as
//! received and checked against the digest asked for or, for a tag, the one the registry
//! announces. Mirrors are asked only for manifests named by digest.

use reqwest::Response;
use reqwest::header;

use super::{CappedError, Client, error_chain};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{self, media};

/// A manifest as the registry sent it.
#[derive(Clone, Debug)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    /// Computed from the bytes (and checked against what was asked or announced).
    pub digest: Digest,
}

impl Client {
    /// Fetch a manifest by tag or digest. When asked by digest the bytes must hash to it
    /// (and mirrors are asked first); when asked by tag they must hash to the
    /// `Docker-Content-Digest` the registry announces.
    pub async fn get_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest> {
        if reference.starts_with("sha256:") {
            self.mirrored(registry, |host| async move {
                self.manifest_at(&host, repository, reference).await
            })
            .await
        } else {
            self.manifest_at(registry, repository, reference).await
        }
    }

    async fn manifest_at(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Result<RawManifest> {
        let url = format!(
            "{}/v2/{repository}/manifests/{reference}",
            self.base_url(registry)
        );
        let accept = media::ACCEPT_MANIFESTS.join(", ");
        let http = self.http_for(&url)?;
        let what = || {
            if reference.starts_with("sha256:") {
                format!("{registry}/{repository}@{reference}")
            } else {
                format!("tag {reference:?} in {registry}/{repository}")
            }
        };
        let object = format!("manifest {}", what());
        let (bytes, content_type, announced) = self
            .retrying_stalls(registry, || async {
                let resp = self
                    .send(registry, &Self::scope_pull(repository), &object, &|| {
                        http.get(&url).header(header::ACCEPT, &accept)
                    })
                    .await?;
                self.manifest_body(registry, &object, resp, what).await
            })
            .await?;
        let expected = match Digest::parse(reference) {
            Ok(d) => Some(d),
            Err(_) => announced,
        };
        if let Some(d) = &expected {
            manifest::verify_manifest(d, &bytes)?;
        }
        Ok(RawManifest {
            digest: manifest::manifest_digest(&bytes),
            bytes,
            content_type,
        })
    }

    /// A manifest response's bytes, content type and announced digest.
    async fn manifest_body(
        &self,
        registry: &str,
        object: &str,
        resp: Response,
        what: impl Fn() -> String,
    ) -> Result<(Vec<u8>, Option<String>, Option<Digest>)> {
        let resp = self.check_status(registry, resp, "manifest", &what).await?;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let announced = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        // Manifests are small; a registry that sends megabytes is not sending a manifest.
        const MAX_MANIFEST: usize = 8 << 20;
        let bytes = self
            .read_capped(registry, object, resp, MAX_MANIFEST)
            .await
            .map_err(|e| match e {
                CappedError::TooLarge => Error::malformed(
                    "manifest",
                    format!("{} is larger than {MAX_MANIFEST} bytes", what()),
                ),
                CappedError::Stalled(e) => e,
                CappedError::Cut(e) => Error::Unreachable {
                    host: registry.to_string(),
                    detail: format!("reading manifest {}: {}", what(), error_chain(&e)),
                },
            })?;
        Ok((bytes, content_type, announced))
    }
}
