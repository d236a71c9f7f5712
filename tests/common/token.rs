//! A test-only token server for the registry's bearer-token auth: it signs JWTs (ES256, with
//! its self-signed certificate in `x5c`) that the real registry verifies against that
//! certificate. It grants pull and push to anyone, or only to `user:pass` when `login` is set.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use base64::Engine as _;
use serde_json::json;

pub const SERVICE: &str = "imgfs-test-registry";
pub const ISSUER: &str = "imgfs-test-issuer";

pub struct TokenServer {
    pub realm: String,
    pub cert_pem: PathBuf,
    _dir: tempfile::TempDir,
    issued: Arc<AtomicUsize>,
    expires_in: Arc<AtomicU64>,
    login: Arc<AtomicBool>,
}

impl TokenServer {
    pub fn start() -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let ck =
            rcgen::generate_simple_self_signed(vec!["imgfs-token-signer".to_string()]).unwrap();
        let cert_pem = dir.path().join("token-cert.pem");
        std::fs::write(&cert_pem, ck.cert.pem()).unwrap();
        let x5c = base64::engine::general_purpose::STANDARD.encode(ck.cert.der());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(ck.signing_key.serialize_pem().as_bytes())
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let issued = Arc::new(AtomicUsize::new(0));
        let expires_in = Arc::new(AtomicU64::new(300));
        let login = Arc::new(AtomicBool::new(false));
        let (i, e, l) = (issued.clone(), expires_in.clone(), login.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    head.push(line.trim_end().to_string());
                }
                let Some(target) = head.first().and_then(|r| r.split(' ').nth(1)) else {
                    continue;
                };
                let url = reqwest::Url::parse(&format!("http://x{target}")).unwrap();
                let scope = url
                    .query_pairs()
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                let want = format!(
                    "authorization: basic {}",
                    base64::engine::general_purpose::STANDARD.encode("user:pass")
                )
                .to_ascii_lowercase();
                let authorized = !l.load(Ordering::SeqCst)
                    || head.iter().any(|h| h.to_ascii_lowercase() == want);
                let mut conn = conn;
                if !authorized {
                    let _ = conn.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let mut parts = scope.splitn(3, ':');
                let (kind, name, actions) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let n = i.fetch_add(1, Ordering::SeqCst);
                let claims = json!({
                    "iss": ISSUER, "sub": "test", "aud": SERVICE,
                    "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("t{n}"),
                    "access": [{"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}],
                });
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                header.x5c = Some(vec![x5c.clone()]);
                let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
                let body =
                    json!({"token": token, "expires_in": e.load(Ordering::SeqCst)}).to_string();
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        TokenServer {
            realm,
            cert_pem,
            _dir: dir,
            issued,
            expires_in,
            login,
        }
    }

    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
    pub fn set_expires_in(&self, secs: u64) {
        self.expires_in.store(secs, Ordering::SeqCst);
    }
    pub fn require_login(&self, on: bool) {
        self.login.store(on, Ordering::SeqCst);
    }
}
