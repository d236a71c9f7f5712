//! What a registry's answer means: a status turned into an error that names the object and
//! the registry's own codes, and a body read whole under a cap (manifests, referrers, token
//! and error bodies) so that no answer is held in memory however large it claims to be.

use futures_util::StreamExt;
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use super::Client;
use super::pace;
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Why a body could not be read whole: it is over the cap, it stalled, or it was cut.
pub(crate) enum CappedError {
    TooLarge,
    Stalled(Error),
    Cut(std::io::Error),
}

/// The full cause chain of an error, on one line: reqwest's top-level message alone
/// ("error sending request") does not say what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl Client {
    /// Turn a non-success status into an error that names the object and the registry's code.
    pub(super) async fn check_status(
        &self,
        registry: &str,
        resp: Response,
        what: &str,
        detail: impl FnOnce() -> String,
    ) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = self.registry_error_text(registry, resp).await;
        Err(match status {
            StatusCode::NOT_FOUND => Error::NotFound {
                what: what.to_string(),
                detail: format!("{} ({text})", detail()),
            },
            StatusCode::FORBIDDEN => Error::Auth {
                host: registry.to_string(),
                detail: format!("access to {} forbidden ({text})", detail()),
            },
            _ => Error::Registry {
                host: registry.to_string(),
                detail: format!("{what} {}: {status} ({text})", detail()),
            },
        })
    }

    /// Read the body of a response from `host` (about `what`) under the stall rules,
    /// refusing more than `max` bytes whatever `Content-Length` says (a chunked response
    /// has none).
    pub(crate) async fn read_capped(
        &self,
        host: &str,
        what: &str,
        resp: Response,
        max: usize,
    ) -> Result<Vec<u8>, CappedError> {
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(CappedError::TooLarge);
        }
        let mut body = self.watch(host, what, resp);
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| match pace::into_stall(e) {
                Ok(stall) => CappedError::Stalled(stall),
                Err(e) => CappedError::Cut(e),
            })?;
            if out.len() + chunk.len() > max {
                return Err(CappedError::TooLarge);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// The registry's error codes and messages, or the status if the body has none.
    pub(super) async fn registry_error_text(&self, registry: &str, resp: Response) -> String {
        let status = resp.status();
        let body = self
            .read_capped(registry, &format!("{status} answer"), resp, 64 << 10)
            .await
            .unwrap_or_default();
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) if !b.errors.is_empty() => b
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            _ => status.to_string(),
        }
    }
}
