//! Registry authentication: credentials from the user's config, the challenge a registry
//! answers with, and the bearer tokens bought with them (cached per scope until they expire).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use docker_credential::{CredentialRetrievalError, DockerCredential};
use reqwest::header::HeaderValue;
use serde::Deserialize;

use crate::error::{Error, Result};

/// What a user has configured for a registry host.
#[derive(Clone, Debug)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token, as `docker login` stores for some registries.
    IdentityToken(String),
}

/// A `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// Parse `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
        })
    }
}

/// `k="v",k2=v2` → map. Quoted values may contain commas (scopes do).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

struct Token {
    value: String,
    refresh_at: Instant,
}

/// Per-process auth state shared by all requests of a [`super::Client`].
#[derive(Default)]
pub struct Auth {
    credentials: Mutex<HashMap<String, Option<Credential>>>,
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<(String, String), Token>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Auth {
    /// Auth state that uses `explicit` credentials for their hosts instead of the user's
    /// configuration.
    pub fn with_credentials(explicit: HashMap<String, Credential>) -> Auth {
        Auth {
            credentials: Mutex::new(explicit.into_iter().map(|(h, c)| (h, Some(c))).collect()),
            ..Auth::default()
        }
    }

    /// The credential configured for `host`, looked up once per process.
    pub fn credential(&self, host: &str) -> Option<Credential> {
        let mut map = self.credentials.lock().unwrap();
        map.entry(host.to_string())
            .or_insert_with(|| lookup_credential(host))
            .clone()
    }

    /// The `Authorization` header to send to `host` for `scope`, fetching a fresh bearer
    /// token when the cached one is missing or near expiry.
    pub async fn header(
        &self,
        client: &super::Client,
        host: &str,
        scope: &str,
    ) -> Result<Option<HeaderValue>> {
        let challenge = self.challenges.lock().unwrap().get(host).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credential(host).and_then(|c| match c {
                Credential::Basic { username, password } => {
                    Some(basic_header(&username, &password))
                }
                Credential::IdentityToken(_) => None,
            })),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (host.to_string(), scope.to_string());
                if let Some(t) = self.tokens.lock().unwrap().get(&key)
                    && Instant::now() < t.refresh_at
                {
                    return Ok(Some(bearer_header(&t.value)));
                }
                let token = self
                    .fetch_token(client, host, &realm, service.as_deref(), scope)
                    .await?;
                let header = bearer_header(&token.value);
                self.tokens.lock().unwrap().insert(key, token);
                Ok(Some(header))
            }
        }
    }

    /// Learn from a 401: remember how `host` wants to be authenticated and drop the token
    /// it refused, so that the next [`Auth::header`] fetches a fresh one. The caller retries
    /// once; a second 401 means the credentials themselves were refused.
    pub fn on_unauthorized(
        &self,
        host: &str,
        scope: &str,
        www_authenticate: Option<&str>,
    ) -> Result<()> {
        let challenge = www_authenticate
            .and_then(Challenge::parse)
            .ok_or_else(|| Error::Auth {
                host: host.to_string(),
                detail: format!(
                    "401 with an unusable WWW-Authenticate header: {:?}",
                    www_authenticate.unwrap_or("")
                ),
            })?;
        if challenge == Challenge::Basic && self.credential(host).is_none() {
            return Err(Error::Auth {
                host: host.to_string(),
                detail: "the registry wants a user name and password and none is configured \
                         (docker login, or auths in ~/.docker/config.json)"
                    .into(),
            });
        }
        self.challenges
            .lock()
            .unwrap()
            .insert(host.to_string(), challenge);
        self.tokens
            .lock()
            .unwrap()
            .remove(&(host.to_string(), scope.to_string()));
        Ok(())
    }

    /// Buy a bearer token for `scope` from the token server at `realm`, with `host`'s
    /// credentials if it has any.
    async fn fetch_token(
        &self,
        client: &super::Client,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token> {
        let fail = |detail: String| token_error(host, detail);
        let http = client.http_for(realm)?;
        // Stalls are booked under the token server's own host: it may not be the registry.
        let realm_host = host_of(realm).unwrap_or_else(|| host.to_string());
        let what = format!("token for {scope} from {realm}");
        let req = self.token_request(&http, host, realm, service, scope);
        let resp = client
            .execute(&realm_host, &what, req)
            .await
            .map_err(|e| match e {
                super::SendError::Stalled(e) => e,
                super::SendError::Http(e) => {
                    fail(format!("token server {realm}: {}", super::error_chain(&e)))
                }
            })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!(
                "token server {realm} answered {status}{}",
                if status.as_u16() == 401 || status.as_u16() == 403 {
                    " (credentials refused or no access to this repository)"
                } else {
                    ""
                }
            )));
        }
        let raw = client
            .read_capped(&realm_host, &what, resp, 1 << 20)
            .await
            .map_err(|e| match e {
                super::CappedError::Stalled(e) => e,
                _ => fail(format!(
                    "token server {realm}: unreadable or oversized answer"
                )),
            })?;
        parse_token(&raw, host, realm)
    }

    /// The request for a token: a refresh-token grant (OAuth2 form post) with an identity
    /// token, else a GET, with a user name and password if `host` has them.
    fn token_request(
        &self,
        http: &reqwest::Client,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> reqwest::RequestBuilder {
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        match self.credential(host) {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = query.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "imgfs"),
                ]);
                http.post(realm).form(&form)
            }
            Some(Credential::Basic { username, password }) => http.get(realm).query(&query).header(
                reqwest::header::AUTHORIZATION,
                basic_header(&username, &password),
            ),
            None => http.get(realm).query(&query),
        }
    }
}

/// An authentication failure at `host`.
fn token_error(host: &str, detail: String) -> Error {
    Error::Auth {
        host: host.to_string(),
        detail,
    }
}

/// `host[:port]` of `url`, if it parses.
fn host_of(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    let h = u.host_str()?.to_string();
    Some(match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h,
    })
}

/// The token in the answer `raw` of the token server at `realm` (for `host`), with when to
/// buy the next.
fn parse_token(raw: &[u8], host: &str, realm: &str) -> Result<Token> {
    let fail = |detail: String| token_error(host, detail);
    let body: TokenResponse = serde_json::from_slice(raw)
        .map_err(|e| fail(format!("token server {realm} sent no usable token: {e}")))?;
    let value = body
        .token
        .or(body.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| fail(format!("token server {realm} sent no token")))?;
    // The spec's default lifetime is 60 s. Refresh a little early so that a token never
    // expires between our check and the registry's.
    // Clamped: a token server's number must not overflow our clock arithmetic.
    let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).clamp(1, 24 * 3600));
    let margin = (lifetime / 10).min(Duration::from_secs(10));
    Ok(Token {
        value,
        refresh_at: Instant::now() + lifetime - margin,
    })
}

fn basic_header(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header");
    v.set_sensitive(true);
    v
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    v.set_sensitive(true);
    v
}

/// Docker's config (`auths`, `credHelpers`, `credsStore`; honours `$DOCKER_CONFIG`) first,
/// then podman's `auth.json`. A helper that fails is logged and treated as "no credential".
fn lookup_credential(host: &str) -> Option<Credential> {
    let keys: Vec<String> = if host == "docker.io" || host == "index.docker.io" {
        vec!["https://index.docker.io/v1/".into(), "docker.io".into()]
    } else {
        vec![
            host.to_string(),
            format!("https://{host}"),
            format!("http://{host}"),
        ]
    };
    let convert = |c: DockerCredential| match c {
        DockerCredential::UsernamePassword(username, password) => {
            Credential::Basic { username, password }
        }
        DockerCredential::IdentityToken(t) => Credential::IdentityToken(t),
    };
    let docker_config = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))
        .map(|d| d.join("config.json"));
    if docker_config.is_some_and(|p| p.is_file()) {
        for key in &keys {
            match docker_credential::get_credential(key) {
                Ok(c) => return Some(convert(c)),
                Err(CredentialRetrievalError::NoCredentialConfigured) => {}
                Err(e) => {
                    // One warning is enough: the other keys would fail the same way.
                    tracing::warn!("docker credentials for {host}: {e}");
                    break;
                }
            }
        }
    }
    for key in &keys {
        if let Ok(c) = docker_credential::get_podman_credential(key) {
            return Some(convert(c));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge_with_commas_in_scope() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg".into())
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
    }
}
