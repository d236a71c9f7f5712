//! A loopback HTTP proxy between imgfs and the real registry that can misbehave on purpose:
//! cut blob downloads mid-body, ignore `Range`, and count what it served. One request per
//! connection (it forces `Connection: close`), which keeps it small and its cuts exact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct State {
    upstream: String,
    /// How many of the coming blob GETs to cut, and after how many body bytes.
    cuts_left: AtomicUsize,
    cut_after: AtomicU64,
    ignore_range: AtomicBool,
    /// How many coming requests to answer with `fail_status` (and `Retry-After: 0`).
    fails_left: AtomicUsize,
    fail_status: AtomicU64,
    /// Request lines seen, with their Range header if any.
    log: Mutex<Vec<String>>,
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

    pub fn ignore_range(&self, on: bool) {
        self.state.ignore_range.store(on, Ordering::SeqCst);
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

    let mut upstream = TcpStream::connect(&st.upstream)?;
    upstream.write_all(out.as_bytes())?;
    let mut up_w = upstream.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut up_w);
    });

    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
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
    client_w.write_all(format!("{}\r\n\r\n", resp_head.join("\r\n")).as_bytes())?;
    if cut {
        let limit = st.cut_after.load(Ordering::SeqCst);
        std::io::copy(&mut (&mut from_up).take(limit), &mut client_w)?;
    } else {
        std::io::copy(&mut from_up, &mut client_w)?;
    }
    let _ = client_w.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    Ok(())
}
