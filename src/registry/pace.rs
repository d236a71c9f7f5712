//! The rules that end an attempt on a registry that has stopped sending, so that no command
//! waits on a stalled server for ever: the *stall rule* (no byte for `stall`, the wait for a
//! response's headers included) and the *low-speed rule* (fewer than `low_speed_limit`
//! bytes a second over a window of `low_speed_time`, like curl's `--speed-limit` /
//! `--speed-time`: a trickle of a byte every few seconds never trips the stall rule).
//!
//! Every response body the client reads goes through [`Watched`]; `Client::send` bounds the
//! wait for headers. A stalled attempt is retried like any transient failure, but each host
//! has a [`StallBook`] entry: after [`STALL_ATTEMPTS`] stalled attempts in a row (nothing
//! completing meanwhile) the host is refused at once for `stall`, so a command on a
//! registry that stalls for ever ends after about `STALL_ATTEMPTS × max(stall,
//! low_speed_time)` whatever its retry loops would otherwise do. A long-lived mount asks the
//! host again after that rest.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::error::Error;

/// Stalled attempts in a row after which a host is refused for a while (a mirror: after one,
/// since the registry itself can answer instead).
pub const STALL_ATTEMPTS: u32 = 3;

/// How slow is too slow. The defaults fail only what no real link does: a working link,
/// even 2G or a throttled mobile plan (≥ 4 KiB/s shared by a few parallel downloads), sends
/// more than 1 KiB/s per transfer and is never silent for 30 s (TCP's retransmission
/// backoff after a loss burst stays well under that).
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// No byte (response headers included) for this long fails the attempt.
    pub stall: Duration,
    /// Fewer bytes a second than this, averaged over `low_speed_time`, fails the attempt.
    /// 0 turns the rule off.
    pub low_speed_limit: u64,
    pub low_speed_time: Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            stall: Duration::from_secs(30),
            low_speed_limit: 1024,
            low_speed_time: Duration::from_secs(30),
        }
    }
}

/// `5 s`, `1.5 s`: how durations read in messages.
pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// When a request was sent: the low-speed window starts there, so the wait for headers
/// counts in it and one attempt on a server that stalls for ever lasts at most
/// `max(stall, low_speed_time)`. Kept in the response's extensions by `Client::send`.
#[derive(Clone, Copy)]
pub(crate) struct Sent(pub Instant);

/// Recent stalls per host.
#[derive(Default)]
pub(crate) struct StallBook {
    hosts: Mutex<HashMap<String, HostStalls>>,
}

struct HostStalls {
    in_row: u32,
    /// What stalled last, and how.
    what: String,
    reason: String,
    /// When the host stalled the attempt that made it refused.
    refused_since: Option<Instant>,
}

impl StallBook {
    /// The error to fail an attempt at `host` for `what` with, without sending it: the host
    /// stalled [`STALL_ATTEMPTS`] times in a row less than `rest` ago. After the rest one
    /// more attempt is let through; if it stalls too, the host is refused again.
    pub fn refuse(&self, host: &str, what: &str, rest: Duration) -> Option<Error> {
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.get(host)?;
        let since = h.refused_since?;
        if since.elapsed() >= rest {
            return None;
        }
        let reason = if h.what == what {
            h.reason.clone()
        } else {
            format!("the registry stalled on {}: {}", h.what, h.reason)
        };
        Some(Error::Stalled {
            host: host.to_string(),
            what: what.to_string(),
            reason,
            attempts: h.in_row,
        })
    }

    /// Whether `host` is being refused (so that a retry loop stops at once).
    pub fn refusing(&self, host: &str, rest: Duration) -> bool {
        self.refuse(host, "", rest).is_some()
    }

    /// Record that an attempt at `host` for `what` stalled; `limit` stalls in a row make it
    /// refused. Returns the error that names it.
    pub fn stalled(&self, host: &str, what: &str, reason: String, limit: u32) -> Error {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let h = hosts.entry(host.to_string()).or_insert(HostStalls {
            in_row: 0,
            what: String::new(),
            reason: String::new(),
            refused_since: None,
        });
        h.in_row += 1;
        h.what = what.to_string();
        h.reason = reason.clone();
        if h.in_row >= limit {
            h.refused_since = Some(Instant::now());
        }
        tracing::debug!("{host}: {what} stalled ({reason}), {} in a row", h.in_row);
        Error::Stalled {
            host: host.to_string(),
            what: what.to_string(),
            reason,
            attempts: h.in_row,
        }
    }

    /// A response from `host` came in whole: it is answering.
    pub fn answered(&self, host: &str) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if !hosts.is_empty() {
            hosts.remove(host);
        }
    }
}

/// What a stalled body's stream yields, inside an `io::Error` (kind `TimedOut`), so that
/// consumers that see only I/O errors can tell a stall from a cut and give the error back.
#[derive(Debug)]
struct StallCut {
    error: Error,
    /// The host is now refused: resuming is pointless.
    refused: bool,
}

impl std::fmt::Display for StallCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for StallCut {}

/// If `e` is a stalled body's error: whether that is final (its host, not a mirror, is now
/// refused: resuming would only be refused too).
pub fn stall_refused(e: &io::Error) -> Option<bool> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<StallCut>())
        .map(|s| s.refused)
}

/// The library error inside a stalled body's I/O error, or the I/O error as it was.
pub fn into_stall(e: io::Error) -> Result<Error, io::Error> {
    if stall_refused(&e).is_none() {
        return Err(e);
    }
    let inner = e.into_inner().expect("checked above");
    Ok(inner
        .downcast::<StallCut>()
        .map(|s| s.error)
        .expect("checked above"))
}

/// A response body under the stall and low-speed rules. Ends with an error when either is
/// broken, recording the stall in the host's [`StallBook`] entry; recording an answer when
/// the body ends whole.
pub(crate) struct Watched {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    pace: Pace,
    limit: u32,
    /// The host is a mirror: its stall is never final, the registry is asked next.
    mirror: bool,
    book: Arc<StallBook>,
    host: String,
    what: String,
    timer: Pin<Box<Sleep>>,
    last_byte: Instant,
    /// The current low-speed window (they follow each other: a window that brought enough
    /// bytes starts the next) and the bytes it brought.
    window_start: Instant,
    window_bytes: u64,
    done: bool,
}

impl Watched {
    pub fn new(
        resp: reqwest::Response,
        pace: Pace,
        limit: u32,
        mirror: bool,
        book: Arc<StallBook>,
        host: &str,
        what: &str,
    ) -> Watched {
        let now = Instant::now();
        let sent = resp.extensions().get::<Sent>().map_or(now, |s| s.0);
        Watched {
            inner: Box::pin(resp.bytes_stream()),
            pace,
            limit,
            mirror,
            book,
            host: host.to_string(),
            what: what.to_string(),
            timer: Box::pin(tokio::time::sleep_until(now + pace.stall)),
            // The headers just arrived: they are the last bytes.
            last_byte: now,
            window_start: sent,
            window_bytes: 0,
            done: false,
        }
    }

    fn low_speed_on(&self) -> bool {
        self.pace.low_speed_limit > 0 && !self.pace.low_speed_time.is_zero()
    }

    fn deadline(&self) -> Instant {
        let stall = self.last_byte + self.pace.stall;
        if self.low_speed_on() {
            stall.min(self.window_start + self.pace.low_speed_time)
        } else {
            stall
        }
    }

    /// Which rule the body breaks at `now`, if any; rolls the low-speed window on.
    fn broken(&mut self, now: Instant) -> Option<String> {
        if now >= self.last_byte + self.pace.stall {
            return Some(format!("no data for {}", secs(self.pace.stall)));
        }
        if self.low_speed_on() && now >= self.window_start + self.pace.low_speed_time {
            let t = self.pace.low_speed_time;
            let need = (self.pace.low_speed_limit as f64 * t.as_secs_f64()) as u64;
            if self.window_bytes < need {
                return Some(format!(
                    "{} bytes in {}, under the minimum of {} bytes/s \
                     (IMGFS_LOW_SPEED_LIMIT, IMGFS_LOW_SPEED_TIME)",
                    self.window_bytes,
                    secs(t),
                    self.pace.low_speed_limit
                ));
            }
            self.window_start = now;
            self.window_bytes = 0;
        }
        None
    }

    fn fail(&mut self, reason: String) -> io::Error {
        self.done = true;
        let error = self
            .book
            .stalled(&self.host, &self.what, reason, self.limit);
        let refused = !self.mirror
            && matches!(&error, Error::Stalled { attempts, .. } if *attempts >= self.limit);
        io::Error::new(io::ErrorKind::TimedOut, StallCut { error, refused })
    }
}

impl Stream for Watched {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(reason) = this.broken(Instant::now()) {
                return Poll::Ready(Some(Err(this.fail(reason))));
            }
            match this.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => {
                    if !b.is_empty() {
                        this.last_byte = Instant::now();
                        this.window_bytes += b.len() as u64;
                    }
                    return Poll::Ready(Some(Ok(b)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::other(format!(
                        "{} cut: {}",
                        this.what,
                        super::error_chain(&e)
                    )))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.book.answered(&this.host);
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let deadline = this.deadline();
                    this.timer.as_mut().reset(deadline);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // The deadline has passed: check the rules again.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A body of `pieces` sent `gap` apart, as `Watched` sees it.
    fn watched(pieces: usize, gap: Duration, pace: Pace, book: Arc<StallBook>) -> Watched {
        let stream = futures_util::stream::unfold(0, move |i| async move {
            if i == pieces {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok(Bytes::from_static(b"x")), i + 1))
        });
        let now = Instant::now();
        Watched {
            inner: Box::pin(stream),
            pace,
            limit: STALL_ATTEMPTS,
            mirror: false,
            book,
            host: "h".into(),
            what: "blob b".into(),
            timer: Box::pin(tokio::time::sleep_until(now + pace.stall)),
            last_byte: now,
            window_start: now,
            window_bytes: 0,
            done: false,
        }
    }

    async fn drain(mut w: Watched) -> io::Result<usize> {
        let mut n = 0;
        while let Some(b) = w.next().await {
            n += b?.len();
        }
        Ok(n)
    }

    // Real time, in milliseconds: tokio's paused clock needs a feature the crate does not
    // otherwise use.
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn silence_breaks_the_stall_rule() {
        let pace = Pace {
            stall: ms(100),
            ..Pace::default()
        };
        let book = Arc::new(StallBook::default());
        let e = drain(watched(3, ms(200), pace, book.clone()))
            .await
            .unwrap_err();
        assert_eq!(stall_refused(&e), Some(false));
        let msg = into_stall(e).unwrap().to_string();
        assert_eq!(
            msg,
            "registry h: blob b stalled: no data for 0.1 s (1 attempt)"
        );
    }

    #[tokio::test]
    async fn a_trickle_breaks_the_low_speed_rule() {
        let pace = Pace {
            stall: ms(1000),
            low_speed_limit: 10,
            low_speed_time: ms(500),
        };
        let book = Arc::new(StallBook::default());
        let t = Instant::now();
        let e = drain(watched(100, ms(200), pace, book)).await.unwrap_err();
        // Not before the window is over; the reason names the rule (exact figures depend
        // on how busy the machine is).
        assert!(t.elapsed() >= ms(500), "{:?}", t.elapsed());
        let e = e.to_string();
        assert!(
            e.contains("bytes in") && e.contains("under the minimum"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_slow_steady_body_passes_and_resets_the_book() {
        let pace = Pace {
            stall: ms(300),
            low_speed_limit: 1,
            low_speed_time: ms(400),
        };
        let book = Arc::new(StallBook::default());
        book.stalled("h", "blob b", "x".into(), 1);
        assert!(book.refusing("h", ms(60_000)));
        let got = drain(watched(10, ms(100), pace, book.clone())).await;
        assert_eq!(got.unwrap(), 10);
        assert!(!book.refusing("h", ms(60_000)));
    }

    #[tokio::test]
    async fn stalls_in_a_row_make_the_host_refused_for_a_rest() {
        let book = StallBook::default();
        for _ in 0..STALL_ATTEMPTS - 1 {
            book.stalled("h", "blob a", "no data for 1 s".into(), STALL_ATTEMPTS);
            assert!(book.refuse("h", "blob a", ms(100)).is_none());
        }
        book.stalled("h", "blob a", "no data for 1 s".into(), STALL_ATTEMPTS);
        let e = book.refuse("h", "blob b", ms(100)).unwrap();
        assert_eq!(
            e.to_string(),
            "registry h: blob b stalled: the registry stalled on blob a: no data for 1 s \
             (3 attempts)"
        );
        assert!(book.refuse("other", "blob b", ms(100)).is_none());
        tokio::time::sleep(ms(150)).await;
        assert!(book.refuse("h", "blob b", ms(100)).is_none());
    }
}
