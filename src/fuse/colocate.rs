//! Keeps a FUSE request thread on the CPU of the process it is serving, for as long as that
//! process sends it a burst of requests.
//!
//! Why: a walk such as `find` is a strict ping-pong. The walker sleeps until each reply, and
//! the request thread sleeps until each request. When the two sleep on different CPUs, every
//! hand-over is a cross-CPU wakeup. On a VM that is an IPI and a halted vCPU coming back, about
//! 25–30 µs here, twice per request. The scheduler puts a woken thread on an idle CPU rather
//! than next to its waker, so left alone the two end up apart. On one CPU, each hand-over is a
//! plain context switch: with everything pinned to one CPU by hand, a first `find` of the bench
//! image took 0.096 s instead of 0.16 s; following the walker as below, about 0.11 s.
//! (FUSE over io_uring queues requests per CPU for this very reason; fuser does not speak it.)
//!
//! The thread follows only a burst from one requester (no gap over [`BURST_GAP`]), and lets go
//! as soon as another requester or a pause shows up, so concurrent users are spread by the
//! scheduler as usual. Reads are not followed: their work runs on the blocking pool anyway.
//! Everything here is a hint: any failure leaves the thread where the scheduler put it.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// Requests further apart than this end a burst.
const BURST_GAP: Duration = Duration::from_millis(1);
/// A burst is followed from its `FOLLOW_AFTER`-th request, so a lone `stat` costs nothing.
const FOLLOW_AFTER: u32 = 8;
/// How often the requester's CPU is looked up again during a burst: the scheduler moves it
/// (a woken thread goes to an idle CPU), and each lookup is one `pread` of its open stat file.
const RECHECK: Duration = Duration::from_millis(1);

struct State {
    pid: u32,
    run: u32,
    last: Instant,
    checked: Option<Instant>,
    /// The CPU this thread is pinned to, if any.
    pinned: Option<usize>,
    /// The thread's own CPU set, restored when a burst ends.
    allowed: Option<CpuSet>,
    /// The requester's `/proc/<pid>/stat`, opened at its first lookup in the burst.
    stat: Option<std::fs::File>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Notes a request from thread `pid` (as FUSE reports it: 0 when outside our pid namespace).
pub(super) fn note(pid: u32) {
    if pid == 0 {
        return;
    }
    let now = Instant::now();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(|| State {
            pid,
            run: 0,
            last: now,
            checked: None,
            pinned: None,
            allowed: None,
            stat: None,
        });
        if s.pid != pid || now.duration_since(s.last) > BURST_GAP {
            s.pid = pid;
            s.run = 0;
            s.checked = None;
            s.stat = None;
            release(s);
        }
        s.run = s.run.saturating_add(1);
        s.last = now;
        let due = s.checked.is_none_or(|t| now.duration_since(t) > RECHECK);
        if s.run >= FOLLOW_AFTER && due {
            s.checked = Some(now);
            if s.stat.is_none() {
                s.stat = std::fs::File::open(format!("/proc/{pid}/stat")).ok();
            }
            if let Some(cpu) = s.stat.as_ref().and_then(cpu_from) {
                follow(s, cpu);
            }
        }
    });
}

fn follow(s: &mut State, cpu: usize) {
    if s.pinned == Some(cpu) {
        return;
    }
    if s.allowed.is_none() {
        s.allowed = sched_getaffinity(None).ok();
    }
    // Never onto a CPU this thread was not allowed to use.
    let Some(allowed) = &s.allowed else { return };
    if cpu >= CpuSet::MAX_CPU || !allowed.is_set(cpu) || allowed.count() < 2 {
        return;
    }
    let mut one = CpuSet::new();
    one.set(cpu);
    if sched_setaffinity(None, &one).is_ok() {
        s.pinned = Some(cpu);
    }
}

fn release(s: &mut State) {
    if s.pinned.take().is_some()
        && let Some(allowed) = &s.allowed
    {
        let _ = sched_setaffinity(None, allowed);
    }
}

#[cfg(test)]
fn cpu_of(pid: u32) -> Option<usize> {
    cpu_from(&std::fs::File::open(format!("/proc/{pid}/stat")).ok()?)
}

/// The CPU a thread last ran on, from its open `/proc/<pid>/stat` (there is no system call
/// for another thread's CPU). Read from the start: procfs makes the text anew for each read
/// at 0.
fn cpu_from(stat: &std::fs::File) -> Option<usize> {
    let mut buf = [0u8; 1024];
    let n = stat.read_at(&mut buf, 0).ok()?;
    parse_cpu(&buf[..n])
}

/// Field 39 of a stat line. The command name, field 2, may hold spaces and parentheses, so
/// fields are counted from its last closing parenthesis.
fn parse_cpu(stat: &[u8]) -> Option<usize> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After the name come fields 3 (state) onwards; 39 is the 37th of those.
    rest.split_ascii_whitespace().nth(36)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_found_after_a_name_with_spaces_and_parentheses() {
        let stat = b"4242 (a b) c)) S 1 4242 4242 0 -1 4194560 151 0 0 0 0 0 0 0 20 0 1 0 \
                     2117 5439488 377 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 \
                     1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(parse_cpu(stat), Some(1));
        assert_eq!(parse_cpu(b"4242 (x) S 1 2"), None);
    }

    #[test]
    fn a_threads_cpu_is_read_from_proc() {
        let allowed = sched_getaffinity(None).unwrap();
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        for cpu in (0..CpuSet::MAX_CPU).filter(|&c| allowed.is_set(c)) {
            let mut one = CpuSet::new();
            one.set(cpu);
            sched_setaffinity(None, &one).unwrap();
            // Setting the affinity moves the caller before it returns.
            assert_eq!(cpu_of(tid), Some(cpu));
        }
        sched_setaffinity(None, &allowed).unwrap();
    }

    #[test]
    fn a_burst_pins_this_thread_to_the_requesters_cpu_and_a_pause_lets_go() {
        let allowed = sched_getaffinity(None).unwrap();
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&c| allowed.is_set(c))
            .collect();
        if cpus.len() < 2 {
            eprintln!("skipped: one CPU, nothing to follow");
            return;
        }
        // The "requester": a thread parked on the last CPU.
        let target = *cpus.last().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let requester = std::thread::spawn(move || {
            let mut one = CpuSet::new();
            one.set(target);
            sched_setaffinity(None, &one).unwrap();
            tid_tx
                .send(rustix::thread::gettid().as_raw_nonzero().get() as u32)
                .unwrap();
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        for _ in 0..FOLLOW_AFTER - 1 {
            note(tid);
        }
        assert_eq!(
            sched_getaffinity(None).unwrap(),
            allowed,
            "a short burst is not followed"
        );
        note(tid);
        let mut one = CpuSet::new();
        one.set(target);
        assert_eq!(sched_getaffinity(None).unwrap(), one);
        assert_eq!(rustix::thread::sched_getcpu(), target);
        std::thread::sleep(BURST_GAP * 2);
        note(tid);
        assert_eq!(
            sched_getaffinity(None).unwrap(),
            allowed,
            "a pause ends the burst"
        );
        stop_tx.send(()).unwrap();
        requester.join().unwrap();
    }
}
