//! A loopback HTTP proxy between imgfs and the real registry that can misbehave on purpose:
//! cut blob downloads mid-body, ignore `Range`, flip a byte of ranged blob responses, answer
//! with errors, and apply a [`Fault`] to the next blob downloads (delay, flipped byte, a
//! `Content-Length` that lies either way, 429/503 with `Retry-After`, an HTML page with
//! status 200); [`Stall`] the next requests of a kind (accept and never answer, trickle the
//! body a byte at a time); and count what it served. One request per connection (it forces
//! `Connection: close`), which keeps it small and its cuts exact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Something to do to a blob download.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Wait this long before answering.
    Delay(std::time::Duration),
    /// Flip one byte in the middle of the body.
    Flip,
    /// Announce this many bytes more than the body has, send the body, close.
    LengthPlus(u64),
    /// Announce this many bytes fewer than the body has and send only those.
    LengthMinus(u64),
    /// Answer with this status and `Retry-After: 1`, without asking the registry.
    Status(u16),
    /// Send the body 16 KiB at a time, waiting this long between pieces (a slow network, to
    /// kill a process mid-download).
    Trickle(std::time::Duration),
    /// Answer 200 with a small HTML page, without asking the registry (a captive portal or a
    /// CDN's error page).
    Html,
}

/// A way of stopping to send, for [`Proxy::stall_next`].
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// Accept the request and never answer; the connection stays open until the client
    /// closes it.
    Silent,
    /// Pass the registry's headers on at once, then its body one byte every this long.
    Trickle(Duration),
}

/// Which requests a [`Stall`] applies to: those whose request line contains the text, or
/// only those of them with a `Range` header.
#[derive(Clone, Debug)]
pub enum Target {
    Path(String),
    Ranged(String),
}

impl Target {
    fn matches(&self, request_line: &str, ranged: bool) -> bool {
        match self {
            Target::Path(p) => request_line.contains(p.as_str()),
            Target::Ranged(p) => ranged && request_line.contains(p.as_str()),
        }
    }
}

#[derive(Default)]
struct State {
    /// How many of the coming blob GETs get `fault`.
    faults_left: AtomicUsize,
    fault: Mutex<Option<Fault>>,
    upstream: String,
    /// How many of the coming blob GETs to cut, and after how many body bytes.
    cuts_left: AtomicUsize,
    cut_after: AtomicU64,
    ignore_range: AtomicBool,
    /// How many coming requests to answer with `fail_status` (and `Retry-After: 0`).
    fails_left: AtomicUsize,
    fail_status: AtomicU64,
    /// Answer blob GETs with a 307 to this base URL + the request path.
    redirect_blobs: Mutex<Option<String>>,
    /// How many of the coming ranged blob GETs get one byte of their body flipped (only
    /// those of the blob named, when one is).
    corrupt_ranges_left: AtomicUsize,
    corrupt_only: Mutex<Option<String>>,
    /// Body bytes of blob GETs passed to the client.
    blob_bytes: AtomicU64,
    /// Request lines seen, with their Range header if any.
    log: Mutex<Vec<String>>,
    /// How many of the coming requests matching the target to stall, and how.
    stall: Mutex<Option<(Target, usize, Stall)>>,
}

pub struct Proxy {
    pub host: String,
    state: Arc<State>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            ..State::default()
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        Proxy { host, state }
    }

    /// Cut the next `n` blob downloads after `after` body bytes.
    pub fn cut_next_blob_gets(&self, n: usize, after: u64) {
        self.state.cut_after.store(after, Ordering::SeqCst);
        self.state.cuts_left.store(n, Ordering::SeqCst);
    }

    /// Answer the next `n` requests with `status` without asking the registry.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state
            .fail_status
            .store(status as u64, Ordering::SeqCst);
        self.state.fails_left.store(n, Ordering::SeqCst);
    }

    /// Redirect blob downloads to `base` (e.g. another server's `http://host:port`).
    pub fn redirect_blobs_to(&self, base: &str) {
        *self.state.redirect_blobs.lock().unwrap() = Some(base.to_string());
    }

    pub fn ignore_range(&self, on: bool) {
        self.state.ignore_range.store(on, Ordering::SeqCst);
    }

    /// Flip one byte in the body of each of the next `n` blob GETs that carry a Range.
    pub fn corrupt_next_ranges(&self, n: usize) {
        *self.state.corrupt_only.lock().unwrap() = None;
        self.state.corrupt_ranges_left.store(n, Ordering::SeqCst);
    }

    /// The same, for ranges of the blob whose hex digest is `hex` only.
    pub fn corrupt_next_ranges_of(&self, hex: &str, n: usize) {
        *self.state.corrupt_only.lock().unwrap() = Some(hex.to_string());
        self.state.corrupt_ranges_left.store(n, Ordering::SeqCst);
    }

    /// Apply `fault` to each of the next `n` blob GETs.
    pub fn fault_next_blobs(&self, n: usize, fault: Fault) {
        *self.state.fault.lock().unwrap() = Some(fault);
        self.state.faults_left.store(n, Ordering::SeqCst);
    }

    /// Stall each of the next `n` requests that `target` matches.
    pub fn stall_next(&self, target: Target, n: usize, stall: Stall) {
        *self.state.stall.lock().unwrap() = Some((target, n, stall));
    }

    /// Body bytes of blob downloads served so far.
    pub fn blob_bytes(&self) -> u64 {
        self.state.blob_bytes.load(Ordering::SeqCst)
    }

    pub fn reset_counts(&self) {
        self.state.blob_bytes.store(0, Ordering::SeqCst);
        self.state.log.lock().unwrap().clear();
    }

    pub fn log(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }
}

fn read_head<R: BufRead>(r: &mut R) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(lines);
        }
        let t = line.trim_end().to_string();
        if t.is_empty() {
            return Ok(lines);
        }
        lines.push(t);
    }
}

fn handle(client: TcpStream, st: &State) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let head = read_head(&mut from_client)?;
    let Some(request_line) = head.first().cloned() else {
        return Ok(());
    };
    let mut out = format!("{request_line}\r\n");
    let mut range = None;
    for h in &head[1..] {
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if lower.starts_with("range:") {
            range = Some(h.clone());
            if st.ignore_range.load(Ordering::SeqCst) {
                continue;
            }
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    st.log.lock().unwrap().push(match &range {
        Some(r) => format!("{request_line} [{r}]"),
        None => request_line.clone(),
    });

    let take = |n: &AtomicUsize| {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    };
    if take(&st.fails_left) {
        let status = st.fail_status.load(Ordering::SeqCst);
        let mut c = client;
        c.write_all(
            format!(
                "HTTP/1.1 {status} Injected\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        return c.shutdown(Shutdown::Both);
    }

    let stall = {
        let mut guard = st.stall.lock().unwrap();
        match &mut *guard {
            Some((target, n, how)) if *n > 0 && target.matches(&request_line, range.is_some()) => {
                *n -= 1;
                Some(*how)
            }
            _ => None,
        }
    };
    if let Some(Stall::Silent) = stall {
        // Until the client hangs up.
        let mut sink = [0u8; 1024];
        while from_client.read(&mut sink).is_ok_and(|n| n > 0) {}
        return Ok(());
    }

    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
    let fault = if is_blob_get && take(&st.faults_left) {
        *st.fault.lock().unwrap()
    } else {
        None
    };
    if let Some(Fault::Status(status)) = fault {
        let mut c = client;
        c.write_all(
            format!(
                "HTTP/1.1 {status} Injected\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        return c.shutdown(Shutdown::Both);
    }
    if let Some(Fault::Html) = fault {
        let page = b"<html><body><h1>Please log in to the guest network</h1></body></html>\n";
        let mut c = client;
        c.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                page.len()
            )
            .as_bytes(),
        )?;
        c.write_all(page)?;
        return c.shutdown(Shutdown::Both);
    }
    if let Some(Fault::Delay(d)) = fault {
        std::thread::sleep(d);
    }

    let redirect = st.redirect_blobs.lock().unwrap().clone();
    if let Some(base) = redirect
        && request_line.starts_with("GET ")
        && request_line.contains("/blobs/sha256:")
    {
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        let mut c = client;
        c.write_all(
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {base}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )?;
        return c.shutdown(Shutdown::Both);
    }

    let mut upstream = TcpStream::connect(&st.upstream)?;
    upstream.write_all(out.as_bytes())?;
    let mut up_w = upstream.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut up_w);
    });

    let mut from_up = BufReader::new(upstream.try_clone()?);
    let resp_head = read_head(&mut from_up)?;
    let length: u64 = resp_head
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    // Only bodies longer than the cut point count as cut.
    let cut = is_blob_get && length > st.cut_after.load(Ordering::SeqCst) && take(&st.cuts_left);
    let mut client_w = client;
    let announced = match fault {
        Some(Fault::LengthPlus(n)) => length + n,
        Some(Fault::LengthMinus(n)) => length.saturating_sub(n),
        _ => length,
    };
    let head: Vec<String> = resp_head
        .iter()
        .map(|h| {
            if h.to_ascii_lowercase().starts_with("content-length:") {
                format!("Content-Length: {announced}")
            } else {
                h.clone()
            }
        })
        .collect();
    client_w.write_all(format!("{}\r\n\r\n", head.join("\r\n")).as_bytes())?;
    let corrupt = is_blob_get
        && length > 0
        && (matches!(fault, Some(Fault::Flip))
            || (range.is_some()
                && st
                    .corrupt_only
                    .lock()
                    .unwrap()
                    .as_ref()
                    .is_none_or(|hex| request_line.contains(hex.as_str()))
                && take(&st.corrupt_ranges_left)));
    let sent = if let Some(Stall::Trickle(every)) = stall {
        // Until the body ends or the client hangs up (a write fails).
        let mut sent = 0u64;
        let mut byte = [0u8; 1];
        while from_up.read(&mut byte)? == 1 {
            client_w.write_all(&byte)?;
            client_w.flush()?;
            sent += 1;
            std::thread::sleep(every);
        }
        sent
    } else if let Some(Fault::Trickle(pause)) = fault {
        let mut sent = 0u64;
        let mut piece = vec![0u8; 16 << 10];
        loop {
            let n = from_up.read(&mut piece)?;
            if n == 0 {
                break sent;
            }
            client_w.write_all(&piece[..n])?;
            sent += n as u64;
            std::thread::sleep(pause);
        }
    } else if matches!(fault, Some(Fault::LengthMinus(_))) {
        std::io::copy(&mut (&mut from_up).take(announced), &mut client_w)?
    } else if cut {
        let limit = st.cut_after.load(Ordering::SeqCst);
        std::io::copy(&mut (&mut from_up).take(limit), &mut client_w)?
    } else if corrupt {
        let mut body = Vec::new();
        (&mut from_up).take(length).read_to_end(&mut body)?;
        let mid = body.len() / 2;
        body[mid] ^= 0x55;
        client_w.write_all(&body)?;
        body.len() as u64
    } else {
        std::io::copy(&mut from_up, &mut client_w)?
    };
    if is_blob_get {
        st.blob_bytes.fetch_add(sent, Ordering::SeqCst);
    }
    let _ = client_w.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    Ok(())
}

/// A stand-in for blob storage behind a registry redirect: serves fixed bodies by path and
/// records every Authorization header it is sent (it should be sent none).
pub struct BlobStore {
    pub base: String,
    auth_seen: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicUsize>,
}

impl BlobStore {
    /// Serve `blobs` (digest → bytes) at any path ending in the digest.
    pub fn start(blobs: Vec<(String, Vec<u8>)>) -> BlobStore {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let auth_seen = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (auth_seen.clone(), served.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let Ok(head) = read_head(&mut r) else {
                    continue;
                };
                let Some(line) = head.first() else { continue };
                for h in &head[1..] {
                    if h.to_ascii_lowercase().starts_with("authorization:") {
                        seen.lock().unwrap().push(h.clone());
                    }
                }
                let path = line.split(' ').nth(1).unwrap_or("");
                let mut c = conn;
                match blobs.iter().find(|(d, _)| path.ends_with(d.as_str())) {
                    Some((_, body)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = c.write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                                .as_bytes(),
                        );
                        let _ = c.write_all(body);
                    }
                    None => {
                        let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            }
        });
        BlobStore {
            base,
            auth_seen,
            served,
        }
    }

    pub fn auth_seen(&self) -> Vec<String> {
        self.auth_seen.lock().unwrap().clone()
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}
