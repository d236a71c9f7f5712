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
//!
//! This file holds the [`Client`] and its options; its methods live by concern, each layer
//! using only those before it: `hosts` and `mirrors` (where a request goes), `execute` (one
//! request under the pace rules), `response` (what an answer means), `send` (authentication
//! and retries), then the objects: `manifests`, `blobs`, `referrers`, `push`.

pub mod auth;
mod blobs;
mod execute;
mod hosts;
mod manifests;
mod mirrors;
pub mod pace;
mod push;
mod referrers;
mod response;
mod send;

use std::sync::Arc;

pub use blobs::BlobStream;
pub(crate) use execute::SendError;
pub use manifests::RawManifest;
pub use pace::Pace;
use pace::StallBook;
pub(crate) use response::{CappedError, error_chain};
pub(crate) use send::backoff;

use crate::error::Result;

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
}
