//! One tar header block, and PAX records, decoded as Go's `archive/tar` decodes them: the
//! format by its magic and checksum, numbers in octal or base-256, PAX records with the last of
//! a repeated key kept and numbers that must parse whole.

use super::{BLOCK, Header, MAX_SPARSE_REGIONS, too_many_regions};

/// A header block decoded as Go's `readHeader` decodes it.
pub(super) struct RawHeader {
    pub(super) header: Header,
    pub(super) block: [u8; BLOCK],
}

/// A string field: up to its first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |n| &b[..n])
}

/// An octal field as Go's `parseOctal` reads it: NULs and spaces trimmed on both sides,
/// then up to the first NUL; empty reads as 0.
fn octal(b: &[u8]) -> Result<i64, String> {
    let trimmed = {
        let s = b
            .iter()
            .position(|&c| c != 0 && c != b' ')
            .unwrap_or(b.len());
        let e = b
            .iter()
            .rposition(|&c| c != 0 && c != b' ')
            .map_or(s, |p| p + 1);
        &b[s..e.max(s)]
    };
    let digits = cstr(trimmed);
    if digits.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad_number(b))?;
    u64::from_str_radix(text, 8)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
        .ok_or_else(|| bad_number(b))
}

fn bad_number(b: &[u8]) -> String {
    format!("bad number {:?}", String::from_utf8_lossy(b))
}

/// A numeric field: base-256 when its top bit is set (negative when the next is too), else
/// octal. Go's `parseNumeric`.
pub(super) fn numeric(b: &[u8]) -> Result<i64, String> {
    if b.first().is_some_and(|c| c & 0x80 != 0) {
        let inv = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return Err(format!("base-256 number overflows in {} bytes", b.len()));
            }
            x = x << 8 | u64::from(c);
        }
        if x >> 63 > 0 {
            return Err(format!("base-256 number overflows in {} bytes", b.len()));
        }
        return Ok(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    octal(b)
}

/// A decimal number as Go's `strconv.ParseInt(s, 10, 64)`: an optional sign, digits only.
pub(super) fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl RawHeader {
    pub(super) fn parse(block: &[u8; BLOCK]) -> Result<RawHeader, String> {
        let stored = octal(&block[148..156]).map_err(|_| "bad checksum field".to_string())?;
        let (mut unsigned, mut signed) = (0i64, 0i64);
        for (i, &b) in block.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += i64::from(b);
            signed += i64::from(b as i8);
        }
        if stored != unsigned && stored != signed {
            return Err(format!(
                "checksum {stored} does not match the header's ({unsigned})"
            ));
        }
        let magic = &block[257..263];
        let version = &block[263..265];
        let (ustar, star, gnu) = match magic {
            b"ustar\0" if &block[508..512] == b"tar\0" => (false, true, false),
            b"ustar\0" => (true, false, false),
            b"ustar " if version == b" \0" => (false, false, true),
            _ => (false, false, false),
        };
        let v7 = !(ustar || star || gnu);
        let field = |name: &str, r: std::ops::Range<usize>| {
            numeric(&block[r]).map_err(|e| format!("{name}: {e}"))
        };
        let mut h = Header {
            typeflag: block[156],
            name: cstr(&block[0..100]).to_vec(),
            link: cstr(&block[157..257]).to_vec(),
            size: field("size", 124..136)?,
            mode: field("mode", 100..108)?,
            uid: field("uid", 108..116)?,
            gid: field("gid", 116..124)?,
            mtime: field("mtime", 136..148)?,
            ..Header::default()
        };
        if !v7 {
            h.dev_major = field("devmajor", 329..337)?;
            h.dev_minor = field("devminor", 337..345)?;
            let prefix = if ustar {
                cstr(&block[345..500])
            } else if star {
                cstr(&block[345..476])
            } else {
                &[][..]
            };
            if !prefix.is_empty() {
                let mut name = prefix.to_vec();
                name.push(b'/');
                name.extend_from_slice(&h.name);
                h.name = name;
            }
        }
        Ok(RawHeader {
            header: h,
            block: *block,
        })
    }
}

/// PAX records as (key, value), each key once.
pub(super) type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// PAX records `"%d %s=%s\n"`, as Go's `parsePAX`: keys may repeat (the caller keeps the
/// last); 0.0 sparse `GNU.sparse.offset`/`numbytes` pairs are gathered into one
/// `GNU.sparse.map`, as Go turns 0.0 into 0.1.
pub(super) fn parse_pax(mut data: &[u8]) -> Result<Records, String> {
    let mut records: Records = Vec::new();
    let mut sparse_map: Vec<&[u8]> = Vec::new();
    while !data.is_empty() {
        let bad = || "malformed record".to_string();
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let n: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .filter(|n| *n >= 5 && *n as u64 <= data.len() as u64)
            .ok_or_else(bad)? as usize;
        if n <= space + 1 {
            return Err(bad());
        }
        let rec = &data[space + 1..n];
        let (Some((&b'\n', body)), rest) = (rec.split_last(), &data[n..]) else {
            return Err(bad());
        };
        let eq = body.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (key, value) = (&body[..eq], &body[eq + 1..]);
        let value_may_hold_nul = !matches!(key, b"path" | b"linkpath" | b"uname" | b"gname");
        if key.is_empty() || key.contains(&0) || (!value_may_hold_nul && value.contains(&0)) {
            return Err(format!("bad record {:?}", String::from_utf8_lossy(key)));
        }
        data = rest;
        match key {
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let expect: &[u8] = if sparse_map.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                if key != expect || value.contains(&b',') {
                    return Err("sparse 0.0 records out of order".into());
                }
                if sparse_map.len() >= 2 * MAX_SPARSE_REGIONS {
                    return Err(too_many_regions().to_string());
                }
                sparse_map.push(value);
            }
            _ => match records.iter_mut().find(|(k, _)| k == key) {
                Some(r) => r.1 = value.to_vec(),
                None => records.push((key.to_vec(), value.to_vec())),
            },
        }
    }
    if !sparse_map.is_empty() {
        records.retain(|(k, _)| k != b"GNU.sparse.map");
        records.push((b"GNU.sparse.map".to_vec(), sparse_map.join(&b","[..])));
    }
    Ok(records)
}

/// Go's `mergePAX`: a record with an empty value keeps the header's own; numbers must parse
/// whole.
pub(super) fn merge_pax(h: &mut Header, records: &Records) -> Result<(), String> {
    for (key, value) in records {
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            h.xattrs.push((name.to_vec(), value.clone()));
            continue;
        }
        if value.is_empty() {
            continue;
        }
        let number = |what: &str| {
            parse_int(value).ok_or_else(|| {
                format!(
                    "PAX {what} {:?} is not a number",
                    String::from_utf8_lossy(value)
                )
            })
        };
        match key.as_slice() {
            b"path" => h.name = value.clone(),
            b"linkpath" => h.link = value.clone(),
            b"uid" => h.uid = number("uid")?,
            b"gid" => h.gid = number("gid")?,
            b"size" => h.size = number("size")?,
            b"mtime" => h.mtime = pax_time(value)?,
            _ => {}
        }
    }
    Ok(())
}

/// A PAX time `secs[.frac]` in whole seconds, rounded down (Go's `parsePAXTime`).
fn pax_time(value: &[u8]) -> Result<i64, String> {
    let bad = || {
        format!(
            "PAX mtime {:?} is not a time",
            String::from_utf8_lossy(value)
        )
    };
    let (secs, frac) = match value.iter().position(|&b| b == b'.') {
        Some(p) => (&value[..p], &value[p + 1..]),
        None => (value, &[][..]),
    };
    let s = parse_int(secs).ok_or_else(bad)?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let fractional = frac.iter().any(|&b| b != b'0');
    Ok(if secs.first() == Some(&b'-') && fractional {
        s - 1
    } else {
        s
    })
}
