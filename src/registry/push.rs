//! Pushing to a registry (`imgfs index push`): blobs uploaded unless the repository has
//! them, manifests put by tag or digest, and the referrers tag kept for registries without
//! the referrers API.

use bytes::Bytes;
use reqwest::Method;
use reqwest::header;

use super::Client;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest;

impl Client {
    /// Upload a blob (monolithic POST + PUT) unless the repository already has it.
    pub async fn push_blob(&self, registry: &str, repository: &str, data: Bytes) -> Result<Digest> {
        let digest = Digest::of(&data);
        let scope = format!("repository:{repository}:pull,push");
        let base = self.base_url(registry);
        let head_url = format!("{base}/v2/{repository}/blobs/{digest}");
        let http = self.http_for(&base)?;
        let what = format!("blob upload {digest}");
        let head = self
            .send(registry, &scope, &what, &|| http.head(&head_url))
            .await?;
        if head.status().is_success() {
            return Ok(digest);
        }
        let start_url = format!("{base}/v2/{repository}/blobs/uploads/");
        let resp = self
            .send(registry, &scope, &what, &|| http.post(&start_url))
            .await?;
        let resp = self
            .check_status(registry, resp, "upload", || repository.to_string())
            .await?;
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Registry {
                host: registry.to_string(),
                detail: "upload started without a Location".into(),
            })?;
        let mut put_url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location.to_string()
        };
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str(&format!("digest={digest}"));
        let resp = self
            .send(registry, &scope, &what, &|| {
                http.request(Method::PUT, &put_url)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(data.clone())
            })
            .await?;
        self.check_status(registry, resp, "upload", || digest.to_string())
            .await?;
        Ok(digest)
    }

    /// Put a manifest under `reference` (a tag or its digest).
    pub async fn push_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        Ok(self
            .put_manifest(registry, repository, reference, media_type, bytes)
            .await?
            .0)
    }

    /// Put a manifest that has a `subject`; also says whether the registry took note of it
    /// (it answers with `OCI-Subject`, OCI distribution 1.1). When it did not, the pusher
    /// must maintain the `sha256-<hex>` referrers tag itself.
    pub async fn push_referrer(
        &self,
        registry: &str,
        repository: &str,
        media_type: &str,
        bytes: Bytes,
        subject: &Digest,
    ) -> Result<(Digest, bool)> {
        let digest = manifest::manifest_digest(&bytes);
        let (d, recorded) = self
            .put_manifest(registry, repository, digest.as_str(), media_type, bytes)
            .await?;
        Ok((d, recorded.as_ref() == Some(subject)))
    }

    async fn put_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(Digest, Option<Digest>)> {
        let scope = format!("repository:{repository}:pull,push");
        let url = format!(
            "{}/v2/{repository}/manifests/{reference}",
            self.base_url(registry)
        );
        let http = self.http_for(&url)?;
        let what = format!("manifest push {repository}:{reference}");
        let resp = self
            .send(registry, &scope, &what, &|| {
                http.put(&url)
                    .header(header::CONTENT_TYPE, media_type)
                    .body(bytes.clone())
            })
            .await?;
        let resp = self
            .check_status(registry, resp, "manifest push", || {
                format!("{registry}/{repository}:{reference}")
            })
            .await?;
        // The registry names the subject it recorded; trust only an exact answer.
        let subject = resp
            .headers()
            .get("oci-subject")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        Ok((manifest::manifest_digest(&bytes), subject))
    }
}
