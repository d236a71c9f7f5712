use super::*;
use crate::layer::span::{PlainIndexingReader, SpanBytes};
use std::io::Write;

/// Compressible but varied text, deterministic.
fn text(n: usize) -> Vec<u8> {
    let words = [
        "layer",
        "index",
        "gzip",
        "window",
        "block",
        "tar",
        "overlay",
        "/usr/lib/",
    ];
    let mut seed = 7u64;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(words[(seed % 8) as usize].as_bytes());
        out.push(if seed.is_multiple_of(5) { b'\n' } else { b' ' });
        if seed.is_multiple_of(11) {
            out.extend_from_slice(&seed.to_le_bytes());
        }
    }
    out.truncate(n);
    out
}

fn noise(n: usize) -> Vec<u8> {
    let mut seed = 99u64;
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn index(blob: &[u8], span: u64) -> (Vec<u8>, Vec<Checkpoint>) {
    let (out, sp) = index_full(blob, span);
    // Each span digest covers exactly the bytes a range read from its checkpoint needs.
    assert_eq!(sp.span_digests.len(), sp.checkpoints.len());
    for (k, c) in sp.checkpoints.iter().enumerate() {
        let start = (c.in_offset - u64::from(c.bits > 0)) as usize;
        let end = sp
            .checkpoints
            .get(k + 1)
            .map_or(blob.len(), |n| n.in_offset as usize);
        assert_eq!(
            sp.span_digests[k],
            crate::digest::SpanDigest::of(&blob[start..end]),
            "span {k}"
        );
    }
    (out, sp.checkpoints)
}

fn index_full(blob: &[u8], span: u64) -> (Vec<u8>, SeekPoints) {
    let mut r = IndexingReader::with_span(std::io::BufReader::new(blob), span).unwrap();
    let mut out = Vec::new();
    // Small reads, as the tar reader does, so checkpoints land mid-call too.
    let mut buf = vec![0u8; 10_000];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    (out, r.seek_points())
}

fn check_ranges(blob: &[u8], data: &[u8], cps: &[Checkpoint]) {
    let mut cur = std::io::Cursor::new(blob);
    let n = data.len() as u64;
    let mut seed = 3u64;
    let mut cases: Vec<(u64, usize)> = vec![(0, 10), (n - 5, 5), (n - 5, 100), (n, 10)];
    for c in cps {
        cases.push((c.out_offset, 3000));
        cases.push((c.out_offset.saturating_sub(1), 2));
    }
    for _ in 0..50 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        cases.push(((seed >> 11) % n, ((seed >> 40) % 300_000) as usize));
    }
    for (start, len) in cases {
        let got = read_at(&mut cur, cps, start, len, Vec::new()).unwrap();
        let end = (start as usize + len).min(data.len());
        assert_eq!(got, &data[start as usize..end], "range {start}+{len}");
    }
}

#[test]
fn any_range_of_a_single_member_stream() {
    let data = text(6 << 20);
    let blob = gz(&data);
    let (out, cps) = index(&blob, 1 << 20);
    assert_eq!(out, data);
    assert!(cps.len() >= 5, "{} checkpoints", cps.len());
    assert!(
        cps.iter().any(|c| c.bits != 0),
        "some checkpoints sit mid-byte"
    );
    assert!(cps.iter().skip(1).all(|c| c.window.len() == 32 << 10));
    check_ranges(&blob, &data, &cps);
}

#[test]
fn any_range_across_many_members_and_stored_blocks() {
    let parts = [
        text(1_500_000),
        noise(2_000_000),
        text(10),
        Vec::new(),
        noise(700_000),
    ];
    let mut blob = Vec::new();
    let mut data = Vec::new();
    for p in &parts {
        blob.extend(gz(p));
        data.extend_from_slice(p);
    }
    blob.extend([0u8; 512]);
    let (out, cps) = index(&blob, 512 << 10);
    assert_eq!(out, data);
    assert!(cps.len() >= 6, "{} checkpoints", cps.len());
    check_ranges(&blob, &data, &cps);
}

#[test]
fn damaged_streams_are_errors_not_wrong_bytes() {
    let data = text(300_000);
    let blob = gz(&data);
    let mut r = IndexingReader::new(&blob[..blob.len() - 3]).unwrap();
    assert!(
        std::io::copy(&mut r, &mut std::io::sink()).is_err(),
        "cut trailer"
    );
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1; // ISIZE: the length check catches it
    let res = IndexingReader::new(&bad[..])
        .unwrap()
        .read_to_end(&mut Vec::new());
    assert!(res.unwrap_err().to_string().contains("length"));
}

/// Each span decompresses from its own compressed bytes alone (what a range read fetches),
/// and those bytes are exactly what its digest covers.
fn check_spans_alone(blob: &[u8], data: &[u8], sp: &SeekPoints) {
    for k in 0..sp.checkpoints.len() {
        let (a, b) = sp.span_range(k, blob.len() as u64);
        assert_eq!(
            sp.span_digests[k],
            crate::digest::SpanDigest::of(&blob[a as usize..b as usize])
        );
        let (from, to) = sp.span_output(k);
        let to = to.unwrap_or(data.len() as u64);
        let mut span = SpanBytes::new(
            a,
            bytes::Bytes::copy_from_slice(&blob[a as usize..b as usize]),
        );
        let got = read_at(
            &mut span,
            &sp.checkpoints,
            from,
            (to - from) as usize,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(got, &data[from as usize..to as usize], "span {k}");
    }
}

#[test]
fn every_span_decompresses_from_its_own_bytes() {
    let parts = [text(2_500_000), noise(1_200_000), text(900_000)];
    let mut blob = Vec::new();
    let mut data = Vec::new();
    for p in &parts {
        blob.extend(gz(p));
        data.extend_from_slice(p);
    }
    let (out, sp) = index_full(&blob, 700 << 10);
    assert_eq!(out, data);
    assert!(sp.checkpoints.iter().any(|c| c.bits != 0));
    check_spans_alone(&blob, &data, &sp);
}

#[test]
fn plain_layers_get_spans_too() {
    let data = noise(2_500_001);
    let mut r =
        PlainIndexingReader::with_span(std::io::BufReader::with_capacity(7000, &data[..]), 1 << 20);
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    assert_eq!(out, data);
    let sp = r.seek_points();
    let starts: Vec<u64> = sp.checkpoints.iter().map(|c| c.out_offset).collect();
    assert_eq!(starts, [0, 1 << 20, 2 << 20]);
    for k in 0..3 {
        let (a, b) = sp.span_range(k, data.len() as u64);
        assert_eq!(
            sp.span_digests[k],
            crate::digest::SpanDigest::of(&data[a as usize..b as usize])
        );
    }
    // Exactly a multiple of the span: no empty span at the end.
    let mut r = PlainIndexingReader::with_span(&data[..2 << 20], 1 << 20);
    std::io::copy(&mut r, &mut std::io::sink()).unwrap();
    assert_eq!(r.seek_points().span_digests.len(), 2);
}

/// Every stored run found from a checkpoint yields, for any range it covers, the same bytes
/// as inflating; which spans have one follows from the data.
fn check_stored(blob: &[u8], data: &[u8], sp: &SeekPoints) -> (usize, usize) {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(blob).unwrap();
    let (mut stored, mut whole) = (0, 0);
    for (k, cp) in sp.checkpoints.iter().enumerate() {
        let end = sp
            .checkpoints
            .get(k + 1)
            .map_or(data.len() as u64, |c| c.out_offset);
        let Some(run) = Stored::walk(&f, cp, end).unwrap() else {
            continue;
        };
        stored += 1;
        assert_eq!(run.out_start, cp.out_offset);
        assert!(run.out_end() > run.out_start || end == cp.out_offset);
        whole += usize::from(run.out_end() >= end);
        let (a, b) = (run.out_start, run.out_end());
        let n = b - a;
        for (s, l) in [
            (a, n),
            (a, 1),
            (b - 1, 1),
            (a + n / 3, n / 3),
            (a + 7, n / 2),
        ] {
            if l == 0 || !run.covers(s, l) {
                continue;
            }
            let mut out = b"prefix".to_vec();
            run.copy_out(&f, s, l as usize, &mut out).unwrap();
            assert_eq!(&out[..6], b"prefix");
            assert!(
                out[6..] == data[s as usize..(s + l) as usize],
                "span {k}: bytes {s}+{l} differ from inflating"
            );
        }
        assert!(!run.covers(b, 1), "a run covers no byte past its end");
        let mut out = Vec::new();
        assert!(run.copy_out(&f, b - 1, 2, &mut out).is_err());
    }
    (stored, whole)
}

#[test]
fn stored_blocks_are_read_straight_from_the_blob() {
    let mut data = text(300_000);
    data.extend(noise(2_000_000));
    data.extend(text(200_000));
    data.extend(noise(1_000_000));
    let n = 256 << 10;
    let spans = data.len().div_ceil(n);
    // Level 0 keeps everything verbatim: every span is one whole stored run.
    let blob = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        e.write_all(&data).unwrap();
        e.finish().unwrap()
    };
    let (_, sp) = index_full(&blob, n as u64);
    assert_eq!(
        check_stored(&blob, &data, &sp),
        (sp.checkpoints.len(), sp.checkpoints.len())
    );
    // Level 6 stores only the noise: some spans have runs, the text's have none.
    let blob = gz(&data);
    let (_, sp) = index_full(&blob, n as u64);
    let (stored, _) = check_stored(&blob, &data, &sp);
    assert!(
        stored >= 8 && stored < sp.checkpoints.len(),
        "{stored} of {spans}"
    );
    // Several members: a run ends with its member's last block.
    let mut blob = gz(&noise(700_000));
    blob.extend(gz(&text(100_000)));
    blob.extend(gz(&noise(500_000)));
    let mut data = noise(700_000);
    data.extend(text(100_000));
    data.extend(noise(500_000));
    let (_, sp) = index_full(&blob, 200_000);
    let (stored, _) = check_stored(&blob, &data, &sp);
    assert!(stored >= 4, "{stored}");
}

#[test]
fn a_read_over_thousands_of_small_stored_blocks() {
    // A sync flush after every 100 bytes: 100-byte stored blocks, each followed by an empty
    // one, so one read needs several preadv calls of 1024 iovecs.
    let data = noise(600_000);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    for c in data.chunks(100) {
        e.write_all(c).unwrap();
        e.flush().unwrap();
    }
    let blob = e.finish().unwrap();
    let (_, sp) = index_full(&blob, 1 << 30);
    assert_eq!(sp.checkpoints.len(), 1);
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&blob).unwrap();
    let run = Stored::walk(&f, &sp.checkpoints[0], data.len() as u64)
        .unwrap()
        .unwrap();
    assert_eq!(run.out_end(), data.len() as u64);
    assert!(run.ends.len() > 6000, "{} blocks", run.ends.len());
    for (s, l) in [(0, data.len()), (150, 250_001), (99, 2)] {
        let mut out = Vec::new();
        run.copy_out(&f, s as u64, l, &mut out).unwrap();
        assert!(out == data[s..s + l], "bytes {s}+{l}");
    }
}
