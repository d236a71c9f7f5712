//! The referrers API (OCI distribution 1.1): which artifacts name an image as their
//! `subject`. Registries without it answer 404 or something that is not an index; the
//! caller then falls back to the `sha256-<hex>` tag.

use reqwest::header;

use super::{CappedError, Client, error_chain};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::media;

impl Client {
    /// The referrers of `subject` with `artifact_type`, as the OCI index the referrers API
    /// answers with; `None` when the registry has no referrers API (distribution 2.x: 404),
    /// so that the caller falls back to the `sha256-<hex>` tag.
    pub async fn get_referrers(
        &self,
        registry: &str,
        repository: &str,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Vec<u8>>> {
        let url = format!(
            "{}/v2/{repository}/referrers/{subject}?artifactType={artifact_type}",
            self.base_url(registry)
        );
        let http = self.http_for(&url)?;
        let object = format!("referrers of {subject}");
        let resp = self
            .send(registry, &Self::scope_pull(repository), &object, &|| {
                http.get(&url).header(header::ACCEPT, media::OCI_INDEX)
            })
            .await?;
        let is_index = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(media::OCI_INDEX));
        // The spec says a registry with the API answers with an index (empty if nothing
        // refers to the subject); anything else means it has none.
        if !resp.status().is_success() || !is_index {
            return Ok(None);
        }
        const MAX_REFERRERS: usize = 4 << 20;
        // Not retried when it stalls: the lookup is optional and has its own deadline.
        match self
            .read_capped(registry, &object, resp, MAX_REFERRERS)
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(CappedError::TooLarge) => Err(Error::malformed(
                "referrers list",
                format!("of {subject} in {registry}/{repository}: over {MAX_REFERRERS} bytes"),
            )),
            Err(CappedError::Stalled(e)) => Err(e),
            Err(CappedError::Cut(e)) => Err(Error::Unreachable {
                host: registry.to_string(),
                detail: format!("reading the referrers of {subject}: {}", error_chain(&e)),
            }),
        }
    }
}
