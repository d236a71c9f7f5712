//! Requests that survive a registry's bad moments: authenticated as the registry asks (a
//! token fetched again when it expires mid-session), retried with backoff on 429, 5xx,
//! network failures and stalls, honouring `Retry-After`, and never past a host the stall
//! book refuses. Everything that reads from a registry goes through [`Client::send`].

use std::time::Duration;

use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode};

use super::pace::STALL_ATTEMPTS;
use super::{Client, SendError, error_chain};
use crate::error::{Error, Result};

/// How many times a request is sent before a 429, 5xx or network failure is final.
const MAX_ATTEMPTS: u32 = 5;

impl Client {
    /// Run `attempt` (one request and the reading of its body) again when its body stalls,
    /// up to [`STALL_ATTEMPTS`] times in all and only while the host is not refused; stalls
    /// waiting for headers are retried inside [`Client::send`].
    pub(super) async fn retrying_stalls<T, F, Fut>(&self, host: &str, attempt: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match attempt().await {
                Err(e @ Error::Stalled { .. }) if n < STALL_ATTEMPTS && !self.refusing(host) => {
                    tracing::debug!("{e} - retrying");
                    tokio::time::sleep(backoff(n)).await;
                }
                other => return other,
            }
        }
    }

    /// Send a request built by `make`, authenticating as the registry asks and retrying
    /// transient failures (stalls included). Returns any response that is not 401, 429 or
    /// 5xx. `what` names the object asked for, in errors.
    pub(super) async fn send(
        &self,
        registry: &str,
        scope: &str,
        what: &str,
        make: &(dyn Fn() -> RequestBuilder + Sync),
    ) -> Result<Response> {
        // A mirror that fails is skipped for the origin at once, not retried for seconds.
        let max_attempts = if self.is_mirror(registry) {
            1
        } else {
            MAX_ATTEMPTS
        };
        let mut attempt = 0;
        let mut reauthenticated = false;
        loop {
            attempt += 1;
            if let Some(e) = self.book.refuse(registry, what, self.opts.pace.stall) {
                return Err(e);
            }
            let auth = self.auth.header(self, registry, scope).await?;
            let mut req = make();
            if let Some(h) = &auth {
                req = req.header(header::AUTHORIZATION, h.clone());
            }
            let last = attempt >= max_attempts;
            let retry_after = match self.execute(registry, what, req).await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    self.unauthorized(registry, scope, resp, reauthenticated)
                        .await?;
                    reauthenticated = true;
                    continue;
                }
                Ok(resp) if is_transient(resp.status()) => {
                    self.transient(registry, resp, attempt, last).await?
                }
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    self.unanswered(registry, e, last)?;
                    None
                }
            };
            tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt))).await;
        }
    }

    /// A 401: take the registry's challenge so that the next attempt authenticates, or fail
    /// if this attempt already had authenticated anew (the credentials are not enough).
    async fn unauthorized(
        &self,
        registry: &str,
        scope: &str,
        resp: Response,
        reauthenticated: bool,
    ) -> Result<()> {
        if reauthenticated {
            return Err(Error::Auth {
                host: registry.to_string(),
                detail: format!(
                    "access denied to {scope} ({})",
                    self.registry_error_text(registry, resp).await
                ),
            });
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.auth
            .on_unauthorized(registry, scope, challenge.as_deref())
    }

    /// A 429 or 5xx: how long the registry asked to wait, if it did; an error on the `last`
    /// attempt.
    async fn transient(
        &self,
        registry: &str,
        resp: Response,
        attempt: u32,
        last: bool,
    ) -> Result<Option<Duration>> {
        let wait = retry_after(resp.headers());
        if last {
            return Err(Error::Registry {
                host: registry.to_string(),
                detail: format!(
                    "{} after {attempt} attempts ({})",
                    resp.status(),
                    self.registry_error_text(registry, resp).await
                ),
            });
        }
        tracing::debug!("{registry}: {} - retrying", resp.status());
        Ok(wait)
    }

    /// No response: `Ok` when another attempt may get one, the error when none will (the
    /// `last` attempt, a refused host, a name that does not resolve).
    fn unanswered(&self, registry: &str, e: SendError, last: bool) -> Result<()> {
        match e {
            SendError::Stalled(e) => {
                if last || self.refusing(registry) {
                    return Err(e);
                }
                tracing::debug!("{e} - retrying");
            }
            SendError::Http(e) => {
                let text = error_chain(&e);
                // A name that does not resolve will not resolve on retry either.
                let permanent = text.contains("dns error") || text.contains("failed to lookup");
                if permanent || last || e.is_builder() {
                    return Err(Error::Unreachable {
                        host: registry.to_string(),
                        detail: text,
                    });
                }
                tracing::debug!("{registry}: {text} - retrying");
            }
        }
        Ok(())
    }

    pub(super) fn scope_pull(repository: &str) -> String {
        format!("repository:{repository}:pull")
    }
}

fn is_transient(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

/// `Retry-After` in seconds, capped: a registry asking for minutes gets a clear failure sooner.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: u64 = h
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(30)))
}

/// 200 ms, 400 ms, 800 ms… with a little jitter so that parallel fetches do not retry in step.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 200u64 << attempt.saturating_sub(1).min(6);
    let jitter = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64)
        % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}
