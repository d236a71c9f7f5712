//! A client for the distribution API (the registry protocol): manifests, blobs (whole, or from
//! an offset), referrers, and pushes; mirrors tried first for what is content-addressed.
//!
//! Written on reqwest rather than taken from oci-client because imgfs needs control the crate
//! does not give: raw manifest bytes of every type including schema 1, verification of what
//! comes back against the digest asked for, retries with backoff for 429/5xx honouring
//! `Retry-After`, resuming a cut blob with `Range`, re-authenticating when a token expires
//! mid-session, and per-host plain HTTP. reqwest's redirect policy drops `Authorization`
//! when a redirect leaves the host, which is what blob storage redirects need. Every request
//! and body is under the stall and low-speed rules of [`pace`].

pub mod auth;
pub mod pace;
mod push;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{self, HeaderMap};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{self, media};
pub use pace::Pace;
use pace::{STALL_ATTEMPTS, StallBook, Watched, secs};

/// How many times a request is sent before a 429, 5xx or network failure is final.
const MAX_ATTEMPTS: u32 = 5;
/// How long a mirror that failed to answer is left alone before it is asked again.
const MIRROR_REST: Duration = Duration::from_secs(60);

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

/// Options that shape how hosts are reached.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Hosts (`host[:port]`) reached over plain HTTP. Loopback hosts always are.
    pub insecure: Vec<String>,
    /// Credentials to use for these hosts instead of looking in the user's configuration.
    pub credentials: std::collections::HashMap<String, auth::Credential>,
    /// Mirrors (`host[:port]`, same repository names) per registry, tried in order before it
    /// for blobs and manifests asked for by digest: what they send is checked against the
    /// digest, so a mirror can make a fetch fail but never change what is served. Tags are
    /// always resolved at the registry itself.
    pub mirrors: std::collections::HashMap<String, Vec<String>>,
    /// When a registry that stopped sending fails an attempt.
    pub pace: Pace,
}

/// A registry client shared by all requests of one command.
pub struct Client {
    /// For plain HTTP to loopback registries: no TLS roots (loading the system's ~150
    /// certificate files costs ~40 ms, most of a warm mount).
    plain: std::sync::OnceLock<reqwest::Client>,
    /// Everything else; built on first use.
    tls: std::sync::OnceLock<reqwest::Client>,
    opts: ClientOptions,
    auth: auth::Auth,
    /// Mirrors not to ask: until the instant given (they failed to answer), or for the
    /// client's life (`None`: they sent bytes that did not match their digest).
    dead_mirrors: std::sync::Mutex<std::collections::HashMap<String, Option<std::time::Instant>>>,
    /// Stalls per host (shared with the bodies being read).
    book: Arc<StallBook>,
}

/// A manifest as the registry sent it.
#[derive(Clone, Debug)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    /// Computed from the bytes (and checked against what was asked or announced).
    pub digest: Digest,
}

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

fn is_loopback(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    // An address, not a name that merely starts with "127." (127.example.com is remote).
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Client> {
        Ok(Client {
            plain: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            auth: auth::Auth::with_credentials(opts.credentials.clone()),
            opts,
            dead_mirrors: Default::default(),
            book: Default::default(),
        })
    }

    /// The HTTP client for `url` (cheap to clone: it is a handle).
    pub(crate) fn http_for(&self, url: &str) -> Result<reqwest::Client> {
        let host = url
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or(""));
        let plain = host.is_some_and(is_loopback);
        let cell = if plain { &self.plain } else { &self.tls };
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("imgfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15).min(self.opts.pace.stall))
            // A backstop for the bodies nobody reads through `Watched` (push responses):
            // longer than the stall rule, which it must not pre-empt.
            .read_timeout(self.opts.pace.stall * 2);
        if plain {
            b = b.tls_certs_only(Vec::new());
        }
        let c = b.build().map_err(|e| Error::Registry {
            host: "-".into(),
            detail: format!("cannot build an HTTP client: {e}"),
        })?;
        Ok(cell.get_or_init(|| c).clone())
    }

    /// `https://host` or, for loopback and `--insecure-registry` hosts, `http://host`.
    /// Docker Hub's API lives on another host than its name.
    pub fn base_url(&self, registry: &str) -> String {
        let host = match registry {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        };
        let scheme = if is_loopback(host) || self.opts.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }

    /// How many stalls in a row make `host` refused: one for a mirror (the registry can
    /// answer instead), [`STALL_ATTEMPTS`] otherwise.
    fn stall_limit(&self, host: &str) -> u32 {
        if self.is_mirror(host) {
            1
        } else {
            STALL_ATTEMPTS
        }
    }

    /// Send one request, under the stall rule: its headers must come within `pace.stall` of
    /// sending it, unless it uploads more than a little (an upload lasts as long as the
    /// link takes, and the backstop `read_timeout` covers the answer). `what` names the
    /// object in errors. An error is a stall (already recorded) or reqwest's.
    pub(crate) async fn execute(
        &self,
        host: &str,
        what: &str,
        req: RequestBuilder,
    ) -> Result<Response, SendError> {
        const SMALL_UPLOAD: usize = 64 << 10;
        let (http, req) = req.build_split();
        let req = req.map_err(SendError::Http)?;
        let bounded = req
            .body()
            .is_none_or(|b| b.as_bytes().is_some_and(|b| b.len() <= SMALL_UPLOAD));
        let stall = self.opts.pace.stall;
        let sent = tokio::time::Instant::now();
        let answer = http.execute(req);
        let mut resp = if bounded {
            match tokio::time::timeout(stall, answer).await {
                Ok(r) => r.map_err(SendError::Http)?,
                Err(_) => {
                    let reason = format!("no response for {}", secs(stall));
                    let limit = self.stall_limit(host);
                    return Err(SendError::Stalled(
                        self.book.stalled(host, what, reason, limit),
                    ));
                }
            }
        } else {
            answer.await.map_err(SendError::Http)?
        };
        resp.extensions_mut().insert(pace::Sent(sent));
        Ok(resp)
    }

    /// `resp`'s body under the stall and low-speed rules.
    pub(crate) fn watch(&self, host: &str, what: &str, resp: Response) -> Watched {
        Watched::new(
            resp,
            self.opts.pace,
            self.stall_limit(host),
            self.is_mirror(host),
            self.book.clone(),
            host,
            what,
        )
    }

    /// Whether `host` stalled too often lately to be asked now.
    fn refusing(&self, host: &str) -> bool {
        self.book.refusing(host, self.opts.pace.stall)
    }

    /// Run `attempt` (one request and the reading of its body) again when its body stalls,
    /// up to [`STALL_ATTEMPTS`] times in all and only while the host is not refused; stalls
    /// waiting for headers are retried inside [`Client::send`].
    async fn retrying_stalls<T, F, Fut>(&self, host: &str, attempt: F) -> Result<T>
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
    async fn send(
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
            let outcome = self.execute(registry, what, req).await;
            let retry_after = match outcome {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
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
                        .on_unauthorized(registry, scope, challenge.as_deref())?;
                    reauthenticated = true;
                    continue;
                }
                Ok(resp) if is_transient(resp.status()) => {
                    let wait = retry_after(resp.headers());
                    if attempt >= max_attempts {
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
                    wait
                }
                Ok(resp) => return Ok(resp),
                Err(SendError::Stalled(e)) => {
                    if attempt >= max_attempts || self.refusing(registry) {
                        return Err(e);
                    }
                    tracing::debug!("{e} - retrying");
                    None
                }
                Err(SendError::Http(e)) => {
                    let text = error_chain(&e);
                    // A name that does not resolve will not resolve on retry either.
                    let permanent = text.contains("dns error") || text.contains("failed to lookup");
                    if permanent || attempt >= max_attempts || e.is_builder() {
                        return Err(Error::Unreachable {
                            host: registry.to_string(),
                            detail: text,
                        });
                    }
                    tracing::debug!("{registry}: {text} - retrying");
                    None
                }
            };
            tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt))).await;
        }
    }

    fn scope_pull(repository: &str) -> String {
        format!("repository:{repository}:pull")
    }

    /// Whether `host` is configured as some registry's mirror.
    fn is_mirror(&self, host: &str) -> bool {
        self.opts.mirrors.values().flatten().any(|m| m == host)
    }

    /// Run `f` against each mirror of `registry` still believed alive, in order, then against
    /// `registry` itself: the first success wins. A mirror that cannot be reached (or fails
    /// with a server error) is not tried again; one that lacks the object or sends wrong
    /// bytes is only skipped for this object.
    async fn mirrored<T, F, Fut>(&self, registry: &str, f: F) -> Result<T>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mirrors = self.opts.mirrors.get(registry).cloned().unwrap_or_default();
        for m in mirrors {
            if !self.mirror_alive(&m) {
                continue;
            }
            match f(m.clone()).await {
                Ok(v) => return Ok(v),
                Err(
                    e
                    @ (Error::Unreachable { .. } | Error::Registry { .. } | Error::Stalled { .. }),
                ) => {
                    tracing::warn!(
                        "mirror {m} of {registry} is not used for {}s: {e}",
                        MIRROR_REST.as_secs()
                    );
                    self.dead_mirrors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m, Some(std::time::Instant::now() + MIRROR_REST));
                }
                Err(e) => tracing::debug!("mirror {m} of {registry}: {e}; asking {registry}"),
            }
        }
        f(registry.to_string()).await
    }

    fn mirror_alive(&self, m: &str) -> bool {
        match self
            .dead_mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(m)
        {
            None => true,
            Some(None) => false,
            Some(Some(until)) => std::time::Instant::now() >= *until,
        }
    }

    /// Stop asking `registry`'s mirrors, for good: bytes fetched for it did not match their
    /// digest, and a mirror may be why (the caller then retries at the registry). Returns
    /// whether any mirror was still in use.
    pub fn distrust_mirrors(&self, registry: &str) -> bool {
        let Some(mirrors) = self.opts.mirrors.get(registry) else {
            return false;
        };
        let mut any = false;
        for m in mirrors {
            if self.mirror_alive(m) {
                tracing::warn!("mirror {m} of {registry} is not used from now on: wrong bytes");
                any = true;
            }
            self.dead_mirrors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(m.clone(), None);
        }
        any
    }

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

/// Why a request got no response: it stalled (the error says what and where) or reqwest
/// failed.
pub(crate) enum SendError {
    Stalled(Error),
    Http(reqwest::Error),
}

pub(crate) enum CappedError {
    TooLarge,
    Stalled(Error),
    Cut(std::io::Error),
}

impl Client {
    /// Turn a non-success status into an error that names the object and the registry's code.
    async fn check_status(
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
    async fn registry_error_text(&self, registry: &str, resp: Response) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_use_http() {
        let c = Client::new(ClientOptions {
            insecure: vec!["reg.lan:5000".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base_url("localhost"), "http://localhost");
        assert_eq!(c.base_url("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(c.base_url("quay.io"), "https://quay.io");
        assert_eq!(c.base_url("docker.io"), "https://registry-1.docker.io");
        assert_eq!(c.base_url("127.example.com"), "https://127.example.com");
        assert_eq!(c.base_url("[::1]:5000"), "http://[::1]:5000");
    }
}
