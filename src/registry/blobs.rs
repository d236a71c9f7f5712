//! Blobs: streamed from an offset (`Range`, with the registry's answer checked: a 206 must
//! start where asked; a 200 starts over at 0 and says so), or read whole and verified when
//! small. Mirrors are asked first. Streams are not verified here: `fetch` hashes them.

use reqwest::{Response, StatusCode, header};

use super::{CappedError, Client, error_chain};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A blob's bytes from `start` on (where a source could not honour the offset asked for,
/// `start` is 0 and the consumer starts over). Local sources make them too.
pub struct BlobStream {
    pub start: u64,
    /// The source honoured the range asked for (always true for local files; for a registry,
    /// it answered 206).
    pub ranged: bool,
    /// The response's `Content-Type`, if any: for errors about what was received.
    pub content_type: Option<String>,
    pub stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>,
}

impl Client {
    /// Stream a blob from byte `offset` on (from a mirror if one answers). The returned
    /// stream's `start` says where its bytes really begin: a registry that ignores `Range`
    /// starts again at 0. The bytes are not checked here: the caller verifies them.
    pub async fn get_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        end: Option<u64>,
    ) -> Result<BlobStream> {
        self.mirrored(registry, |host| async move {
            self.blob_at(&host, repository, digest, offset, end).await
        })
        .await
    }

    /// A small blob, whole and verified against its digest (a mirror sending wrong bytes is
    /// passed over for the registry). More than `max` bytes is an error.
    pub async fn get_blob_bytes(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        max: usize,
    ) -> Result<Vec<u8>> {
        self.mirrored(registry, |host| async move {
            let object = format!("blob {digest}");
            let bytes = self
                .retrying_stalls(&host, || async {
                    let resp = self
                        .blob_response(&host, repository, digest, 0, None)
                        .await?;
                    self.read_capped(&host, &object, resp, max)
                        .await
                        .map_err(|e| match e {
                            CappedError::TooLarge => Error::malformed(
                                "blob",
                                format!(
                                    "{digest} in {host}/{repository} is larger than {max} bytes"
                                ),
                            ),
                            CappedError::Stalled(e) => e,
                            CappedError::Cut(e) => Error::Unreachable {
                                host: host.clone(),
                                detail: format!("reading blob {digest}: {}", error_chain(&e)),
                            },
                        })
                })
                .await?;
            let actual = Digest::of(&bytes);
            if &actual != digest {
                return Err(Error::DigestMismatch {
                    what: format!("blob from {host}/{repository}"),
                    expected: digest.clone(),
                    actual,
                });
            }
            Ok(bytes)
        })
        .await
    }

    /// A successful response to `GET` blob `digest` from `registry`, asking for bytes
    /// `[offset, end)` when that is not the whole blob.
    async fn blob_response(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        end: Option<u64>,
    ) -> Result<Response> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base_url(registry));
        let http = self.http_for(&url)?;
        let resp = self
            .send(
                registry,
                &Self::scope_pull(repository),
                &format!("blob {digest}"),
                &|| {
                    let r = http.get(&url);
                    match end {
                        Some(end) => r.header(
                            header::RANGE,
                            format!("bytes={offset}-{}", end.saturating_sub(1)),
                        ),
                        None if offset > 0 => r.header(header::RANGE, format!("bytes={offset}-")),
                        None => r,
                    }
                },
            )
            .await?;
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE && offset > 0 {
            return Err(Error::BlobEndsBefore {
                host: registry.to_string(),
                digest: digest.clone(),
                offset,
            });
        }
        self.check_status(registry, resp, "blob", || {
            format!("{digest} in {registry}/{repository}")
        })
        .await
    }

    /// Blob `digest` from `registry` as a stream, from `offset` if the registry honours the
    /// range, else from 0.
    async fn blob_at(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        end: Option<u64>,
    ) -> Result<BlobStream> {
        let resp = self
            .blob_response(registry, repository, digest, offset, end)
            .await?;
        let start = if resp.status() == StatusCode::PARTIAL_CONTENT {
            let range_start = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if range_start != Some(offset) {
                return Err(Error::Registry {
                    host: registry.to_string(),
                    detail: format!(
                        "asked for {digest} from byte {offset}, got Content-Range {:?}",
                        resp.headers().get(header::CONTENT_RANGE)
                    ),
                });
            }
            offset
        } else {
            0
        };
        let ranged = resp.status() == StatusCode::PARTIAL_CONTENT;
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let stream = self.watch(registry, &format!("blob {digest}"), resp);
        Ok(BlobStream {
            start,
            ranged,
            content_type,
            stream: Box::pin(stream),
        })
    }
}
