//! The reader against streams written by hand, one tar dialect question each; real GNU tar
//! sparse archives are read in tests/dialect.rs.

use super::*;

/// A ustar header block with a valid checksum.
fn header(name: &[u8], kind: u8, size: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name);
    b[100..107].copy_from_slice(b"0000644");
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"00000000000");
    b[156] = kind;
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    checksum(&mut b);
    b
}

fn checksum(b: &mut [u8; BLOCK]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
}

fn member(name: &[u8], kind: u8, data: &[u8]) -> Vec<u8> {
    let mut v = header(name, kind, data.len() as u64).to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    v
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = k.len() + v.len() + 3;
        let mut n = rest + 1;
        while format!("{n}").len() + rest != n {
            n += 1;
        }
        body.extend_from_slice(format!("{n} {k}=").as_bytes());
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    member(b"PaxHeader", b'x', &body)
}

fn end() -> Vec<u8> {
    vec![0; 2 * BLOCK]
}

/// An entry's name, type flag and contents.
type Member = (Vec<u8>, u8, Vec<u8>);

/// Every entry.
fn read_all(stream: &[u8]) -> io::Result<Vec<Member>> {
    let mut r = TarReader::new(stream, Limits::default());
    let mut out = Vec::new();
    while let Some(h) = r.next_entry()? {
        let mut data = Vec::new();
        r.data().read_to_end(&mut data)?;
        out.push((h.name, h.typeflag, data));
    }
    Ok(out)
}

fn names(stream: &[u8]) -> Vec<Vec<u8>> {
    read_all(stream).unwrap().into_iter().map(|e| e.0).collect()
}

#[test]
fn archives_from_the_tar_crate_read_whole_with_data_offsets() {
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("{}/file", "d".repeat(150));
    for (p, data) in [("a/", &b""[..]), (long.as_str(), b"hello"), ("a/b", b"xyz")] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if p.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, p, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut r = TarReader::new(&tar[..], Limits::default());
    let mut seen = Vec::new();
    while let Some(h) = r.next_entry().unwrap() {
        let at = h.data_offset as usize;
        seen.push((
            String::from_utf8(h.name).unwrap(),
            tar[at..at + h.size as usize].to_vec(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("a/".to_string(), b"".to_vec()),
            (long, b"hello".to_vec()),
            ("a/b".to_string(), b"xyz".to_vec())
        ]
    );
}

#[test]
fn header_only_types_carry_no_data_whatever_their_size_says() {
    // A directory header claiming 512 bytes: Go reads the next header right after it.
    let mut s = header(b"dir/", b'5', 512).to_vec();
    s.extend(member(b"dir/hidden", b'0', b"seen"));
    s.extend(header(b"link", b'2', 1024));
    s.extend(member(b"after", b'0', b"too"));
    s.extend(end());
    let all = read_all(&s).unwrap();
    let got: Vec<(&[u8], &[u8])> = all.iter().map(|(n, _, d)| (&n[..], &d[..])).collect();
    assert_eq!(
        got,
        vec![
            (&b"dir/"[..], &b""[..]),
            (b"dir/hidden", b"seen"),
            (b"link", b""),
            (b"after", b"too")
        ]
    );
}

#[test]
fn one_zero_block_then_more_is_an_error_and_two_end_the_archive() {
    let mut s = member(b"a", b'0', b"1");
    s.extend([0u8; BLOCK]);
    s.extend(member(b"b", b'0', b"2"));
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("single zero block") && e.contains("1024"), "{e}");

    let mut s = member(b"a", b'0', b"1");
    s.extend(end());
    s.extend(b"trailing bytes after the archive's end are not read");
    assert_eq!(names(&s), vec![b"a".to_vec()]);
    // A stream that simply stops after a member (or after one zero block) ends cleanly.
    assert_eq!(names(&member(b"a", b'0', b"1")), vec![b"a".to_vec()]);
}

#[test]
fn the_last_of_repeated_pax_records_wins() {
    let mut s = pax(&[("path", b"first"), ("path", b"second"), ("mtime", b"-1.5")]);
    s.extend(member(b"ustar-name", b'0', b"x"));
    s.extend(end());
    let mut r = TarReader::new(&s[..], Limits::default());
    let h = r.next_entry().unwrap().unwrap();
    assert_eq!(h.name, b"second");
    assert_eq!(h.mtime, -2, "a fractional time rounds down");
}

#[test]
fn an_empty_pax_value_keeps_the_header_field() {
    let mut s = pax(&[("path", b""), ("uid", b"")]);
    s.extend(member(b"kept", b'0', b"x"));
    s.extend(end());
    assert_eq!(names(&s), vec![b"kept".to_vec()]);
}

#[test]
fn pax_numbers_must_parse_whole_as_in_go() {
    for (key, value, want) in [
        ("size", &b"-5"[..], "negative size"),
        ("size", b"12abc", "not a number"),
        ("mtime", b"1e20", "not a time"),
        ("uid", b" 5", "not a number"),
    ] {
        let mut s = pax(&[(key, value)]);
        s.extend(member(b"f", b'0', b"x"));
        s.extend(end());
        let e = read_all(&s).unwrap_err().to_string();
        assert!(e.contains(want), "{key}={value:?}: {e}");
    }
    // A negative size on a directory is harmless: it has no data either way.
    let mut s = pax(&[("size", b"-5")]);
    s.extend(member(b"d/", b'5', b""));
    s.extend(end());
    assert_eq!(names(&s), vec![b"d/".to_vec()]);
}

#[test]
fn names_are_bytes() {
    let mut s = member(b"\xff", b'0', b"1");
    s.extend(member(b"\xfe", b'0', b"2"));
    s.extend(member("\u{fffd}".as_bytes(), b'0', b"3"));
    s.extend(end());
    assert_eq!(
        names(&s),
        vec![
            b"\xff".to_vec(),
            b"\xfe".to_vec(),
            "\u{fffd}".as_bytes().to_vec()
        ]
    );
}

#[test]
fn base_256_numbers_are_read() {
    let mut h = header(b"big", b'0', 0);
    // uid 2^40 in base-256, mtime -1.
    h[108..116].copy_from_slice(&[0x80, 0, 1, 0, 0, 0, 0, 0]);
    h[136..148].copy_from_slice(&[0xff; 12]);
    checksum(&mut h);
    let mut s = h.to_vec();
    s.extend(end());
    let mut r = TarReader::new(&s[..], Limits::default());
    let got = r.next_entry().unwrap().unwrap();
    assert_eq!((got.uid, got.mtime), (1 << 40, -1));
}

#[test]
fn a_bad_checksum_is_named() {
    let mut h = header(b"f", b'0', 0);
    h[0] = b'g';
    let e = read_all(&h).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
}

#[test]
fn a_huge_long_name_is_refused_from_its_header() {
    // Claims 64 MiB; only the header is there, so refusing must not wait for the data.
    let s = header(b"././@LongLink", b'L', 64 << 20);
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("GNU long name") && e.contains("67108864"), "{e}");
    let s = header(b"PaxHeader", b'x', 2 << 20);
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("PAX header"), "{e}");
}

#[test]
fn limits_on_members_and_size_are_enforced() {
    let mut s = Vec::new();
    for i in 0..10 {
        s.extend(member(format!("f{i}").as_bytes(), b'0', b"x"));
    }
    s.extend(end());
    let limits = Limits {
        max_members: 5,
        ..Limits::default()
    };
    let mut r = TarReader::new(&s[..], limits);
    let e = std::iter::from_fn(|| r.next_entry().transpose())
        .find_map(Result::err)
        .unwrap()
        .to_string();
    assert!(e.contains("more than 5 tar members"), "{e}");
    let limits = Limits {
        max_uncompressed: 2048,
        ..Limits::default()
    };
    let mut r = TarReader::new(&s[..], limits);
    let e = std::iter::from_fn(|| r.next_entry().transpose())
        .find_map(Result::err)
        .unwrap()
        .to_string();
    assert!(e.contains("--max-uncompressed-size"), "{e}");
}

#[test]
fn pax_sparse_0_1_maps_are_expanded() {
    let mut s = pax(&[
        ("GNU.sparse.major", b"0"),
        ("GNU.sparse.minor", b"1"),
        ("GNU.sparse.name", b"real/name"),
        ("GNU.sparse.realsize", b"10000"),
        ("GNU.sparse.numblocks", b"2"),
        ("GNU.sparse.map", b"0,3,9998,2"),
    ]);
    s.extend(member(b"GNUSparseFile.1/name", b'0', b"abcde"));
    s.extend(end());
    let all = read_all(&s).unwrap();
    assert_eq!(all.len(), 1);
    let (name, _, data) = &all[0];
    assert_eq!(name, b"real/name");
    let mut want = vec![0u8; 10000];
    want[..3].copy_from_slice(b"abc");
    want[9998..].copy_from_slice(b"de");
    assert_eq!(data, &want);
}

#[test]
fn sparse_maps_that_do_not_match_the_data_are_refused() {
    for map in [&b"0,3,9998,9"[..], b"0,3,1,2", b"0,2"] {
        let count = if map.len() > 4 { &b"2"[..] } else { b"1" };
        let mut s = pax(&[
            ("GNU.sparse.realsize", b"10000"),
            ("GNU.sparse.numblocks", count),
            ("GNU.sparse.map", map),
        ]);
        s.extend(member(b"f", b'0', b"abcde"));
        s.extend(end());
        let e = read_all(&s).unwrap_err().to_string();
        assert!(e.contains("sparse"), "{map:?}: {e}");
    }
}
