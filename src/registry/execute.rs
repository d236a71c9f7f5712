//! One request sent under the stall rule of [`super::pace`]: the wait for its headers is
//! bounded, and its body is read through [`Watched`]. Every request imgfs makes to a
//! registry or token server goes through [`Client::execute`]; retrying is `send`'s.

use reqwest::{RequestBuilder, Response};

use super::Client;
use super::pace::{self, STALL_ATTEMPTS, Watched, secs};
use crate::error::Error;

/// Why a request got no response: it stalled (the error says what and where) or reqwest
/// failed.
pub(crate) enum SendError {
    Stalled(Error),
    Http(reqwest::Error),
}

impl Client {
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
    pub(super) fn refusing(&self, host: &str) -> bool {
        self.book.refusing(host, self.opts.pace.stall)
    }
}
