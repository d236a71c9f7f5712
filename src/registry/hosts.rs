//! Where a registry's requests go: its base URL (Docker Hub's API host, plain HTTP for
//! loopback and `--insecure-registry` hosts) and the HTTP client that reaches it, built on
//! first use so that a command talking only to loopback never loads TLS roots.

use std::time::Duration;

use super::Client;
use crate::error::{Error, Result};

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
}

#[cfg(test)]
mod tests {
    use super::super::ClientOptions;
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
