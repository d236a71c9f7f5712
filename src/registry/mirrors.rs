//! Mirrors: asked first for what is content-addressed (blobs, manifests by digest), each
//! once per object; one that cannot be reached rests for a while, one that sent wrong bytes
//! is not asked again for the client's life. What a mirror sends is checked by the caller
//! against its digest, so a mirror can make a fetch slower or fail, never wrong.

use std::time::Duration;

use super::Client;
use crate::error::{Error, Result};

/// How long a mirror that failed to answer is left alone before it is asked again.
const MIRROR_REST: Duration = Duration::from_secs(60);

impl Client {
    /// Whether `host` is configured as some registry's mirror.
    pub(super) fn is_mirror(&self, host: &str) -> bool {
        self.opts.mirrors.values().flatten().any(|m| m == host)
    }

    /// Run `f` against each mirror of `registry` still believed alive, in order, then against
    /// `registry` itself: the first success wins. A mirror that cannot be reached (or fails
    /// with a server error) is not tried again; one that lacks the object or sends wrong
    /// bytes is only skipped for this object.
    pub(super) async fn mirrored<T, F, Fut>(&self, registry: &str, f: F) -> Result<T>
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
}
