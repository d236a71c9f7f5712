//! Load: 32 threads reading random files and random ranges of a lazy mount for a bounded
//! time, every byte checked, while the daemon's memory is watched: no error, no wrong byte,
//! and no growth beyond its bounded caches.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::layers::Tar;
use common::mounted::Mounted;
use common::*;

const READERS: usize = 32;
const RUN: Duration = Duration::from_secs(8);

fn vm_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

#[test]
fn thirty_two_readers_get_right_bytes_and_memory_stays_bounded() {
    let reg = registry();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut t1, mut t2) = (Tar::new().dir("g", 0o755), Tar::new().dir("z", 0o755));
    for i in 0..120u64 {
        let size = match i % 10 {
            0 => 3 << 20,
            1..=3 => 300_000 + (i as usize * 7919) % 200_000,
            _ => 1 + (i as usize * 104_729) % 40_000,
        };
        let data = if i % 2 == 0 {
            noise(size, i)
        } else {
            text(size, i)
        };
        let path = if i % 3 == 0 {
            format!("z/f{i}")
        } else {
            format!("g/f{i}")
        };
        if i % 3 == 0 {
            t2 = t2.file(&path, 0o644, &data);
        } else {
            t1 = t1.file(&path, 0o644, &data);
        }
        files.push((path, data));
    }
    let img = FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(t1.bytes()),
            FixtureLayer::zstd_from_tar(t2.bytes()),
        ],
    );
    img.push(&reg.host, "load/many", "v1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &format!("{}/load/many:v1", reg.host), &mnt, &[]);

    let files = Arc::new(files);
    let (reads, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + RUN;
    let threads: Vec<_> = (0..READERS as u64)
        .map(|t| {
            let (files, mnt) = (files.clone(), mnt.clone());
            let (reads, bytes) = (reads.clone(), bytes.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (t + 1);
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                while Instant::now() < deadline {
                    let (path, data) = &files[next() as usize % files.len()];
                    let f = std::fs::File::open(mnt.join(path)).unwrap();
                    let (off, len) = if next() % 2 == 0 {
                        (0, data.len())
                    } else {
                        let off = next() as usize % data.len();
                        (off, 1 + next() as usize % (data.len() - off).min(256 << 10))
                    };
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64)
                        .unwrap_or_else(|e| panic!("{path} at {off}+{len}: {e}"));
                    assert!(
                        buf == data[off..off + len],
                        "{path} at {off}+{len}: wrong bytes"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Past warm-up: the span cache full, every reader's buffers in use.
    std::thread::sleep(RUN / 2);
    let warm = vm_kib(m.pid, "VmRSS:");
    for t in threads {
        t.join().unwrap();
    }
    let end = vm_kib(m.pid, "VmRSS:");
    let peak = vm_kib(m.pid, "VmHWM:");
    let n = reads.load(Ordering::Relaxed);
    eprintln!(
        "load: {n} reads, {} MB checked by {READERS} readers in {RUN:?}; daemon RSS {warm} KiB \
         after warm-up, {end} KiB at the end, peak {peak} KiB",
        bytes.load(Ordering::Relaxed) >> 20
    );
    // No throughput goal here (that is scripts/bench's job): only that every reader worked.
    assert!(n >= 4 * READERS as u64, "only {n} reads");
    // Decompressed pieces (6 × 4 MiB), the index and tree, buffers of reads in flight.
    assert!(peak < 256 << 10, "daemon peak RSS {peak} KiB");
    assert!(
        end < warm + (64 << 10),
        "daemon RSS grew from {warm} to {end} KiB under steady load"
    );
    m.unmount(&cache);
}
