//! Resource limits on an uncompressed layer stream, enforced before the tar parser sees it.
//!
//! Written by hand because the `tar` crate has no limits of its own: it reads a GNU long-name
//! or PAX member whole into memory whatever size its header claims, so a small gzip blob
//! holding one huge zero-filled long-name member (a gzip bomb) exhausts memory before the
//! blob's digest is ever checked. [`TarGuard`] follows the tar stream's block structure (the
//! same rules the crate uses to step from member to member: header size field, PAX `size`
//! overrides, old-GNU sparse extension blocks) and fails the read, naming the problem, when
//! a metadata member is too big, when the layer has too many members, or when it expands
//! past its size limit.

use std::io::Read;

/// The most bytes a GNU long name/link or a PAX header member may hold. Names are at most
/// 4096 bytes; PAX headers carry xattrs too, a few KiB in practice.
pub const MAX_META_MEMBER: u64 = 16 << 20;
/// Default for the most members one layer may have: each costs ~100 bytes of index in
/// memory; the biggest real layers have a few hundred thousand.
pub const DEFAULT_MAX_MEMBERS: u64 = 5_000_000;
/// Default for the most bytes a layer may expand to (`--max-uncompressed-size`).
pub const DEFAULT_MAX_UNCOMPRESSED: u64 = 64 << 30;

const BLOCK: usize = 512;

/// Limits for one layer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most bytes the uncompressed tar stream may have.
    pub max_uncompressed: u64,
    /// The most tar members (headers) it may have.
    pub max_members: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uncompressed: DEFAULT_MAX_UNCOMPRESSED,
            max_members: DEFAULT_MAX_MEMBERS,
        }
    }
}

/// A reader of a tar stream that fails (with `InvalidData`) instead of passing on a stream
/// that breaks [`Limits`] or the caps above.
pub struct TarGuard<R> {
    inner: R,
    limits: Limits,
    total: u64,
    members: u64,
    /// The header block being assembled.
    block: [u8; BLOCK],
    filled: usize,
    /// Data bytes of the current member still to pass, then its padding.
    data_left: u64,
    pad_left: u64,
    /// The data of a PAX member, collected to learn a `size` override for the next member.
    pax: Option<Vec<u8>>,
    pax_size: Option<u64>,
    /// Old-GNU sparse: extension header blocks still to come before the data of this size.
    sparse_ext: Option<u64>,
    /// The stream could not be followed (a header the tar parser will itself refuse): only
    /// the size limit still applies.
    lost: bool,
}

fn refuse(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A tar numeric field: octal text, or GNU's base-256 when the high bit is set.
fn numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The `size` record of a PAX header's data (`"LEN size=N\n"`), if it has one.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    let mut found = None;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return found;
        }
        let record = &rest[sp + 1..len];
        if let Some(v) = record.strip_prefix(b"size=") {
            let v = v.strip_suffix(b"\n").unwrap_or(v);
            found = std::str::from_utf8(v).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    found
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, limits: Limits) -> TarGuard<R> {
        TarGuard {
            inner,
            limits,
            total: 0,
            members: 0,
            block: [0; BLOCK],
            filled: 0,
            data_left: 0,
            pad_left: 0,
            pax: None,
            pax_size: None,
            sparse_ext: None,
            lost: false,
        }
    }

    fn start_data(&mut self, size: u64) {
        self.data_left = size;
        self.pad_left = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    }

    /// A whole header block has arrived.
    fn header(&mut self) -> std::io::Result<()> {
        let b = self.block;
        if let Some(size) = self.sparse_ext {
            // Old-GNU sparse extension block: byte 504 says whether another follows.
            if b[504] == 0 {
                self.sparse_ext = None;
                self.start_data(size);
            }
            return Ok(());
        }
        if b.iter().all(|&x| x == 0) {
            return Ok(()); // end-of-archive blocks
        }
        let Some(mut size) = numeric(&b[124..136]) else {
            self.lost = true;
            return Ok(());
        };
        let kind = b[156];
        let meta = matches!(kind, b'L' | b'K' | b'x' | b'g');
        if !meta && let Some(s) = self.pax_size.take() {
            size = s;
        }
        self.members += 1;
        if self.members > self.limits.max_members {
            return Err(refuse(format!(
                "the layer has more than {} tar members",
                self.limits.max_members
            )));
        }
        if meta && size > MAX_META_MEMBER {
            let what = match kind {
                b'L' => "a GNU long name",
                b'K' => "a GNU long link target",
                _ => "a PAX header",
            };
            return Err(refuse(format!(
                "{what} of {size} bytes in tar member {} (at most {MAX_META_MEMBER} are accepted)",
                self.members
            )));
        }
        if kind == b'x' {
            self.pax = Some(Vec::with_capacity(size as usize));
        }
        if kind == b'S' && b[482] != 0 {
            self.sparse_ext = Some(size);
            return Ok(());
        }
        self.start_data(size);
        Ok(())
    }

    /// Follow the stream through `bytes`.
    fn follow(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() && !self.lost {
            if self.data_left > 0 {
                let n = (self.data_left.min(bytes.len() as u64)) as usize;
                if let Some(p) = &mut self.pax {
                    p.extend_from_slice(&bytes[..n]);
                }
                self.data_left -= n as u64;
                bytes = &bytes[n..];
                if self.data_left == 0
                    && let Some(p) = self.pax.take()
                {
                    self.pax_size = pax_size(&p);
                }
                continue;
            }
            if self.pad_left > 0 {
                let n = (self.pad_left.min(bytes.len() as u64)) as usize;
                self.pad_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK - self.filled).min(bytes.len());
            self.block[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.header()?;
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.limits.max_uncompressed {
            return Err(refuse(format!(
                "the layer expands past {} bytes (--max-uncompressed-size)",
                self.limits.max_uncompressed
            )));
        }
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn drain(bytes: &[u8], limits: Limits) -> std::io::Result<()> {
        // Small reads, so that headers arrive split.
        let mut g = TarGuard::new(bytes, limits);
        let mut buf = [0u8; 97];
        while g.read(&mut buf)? > 0 {}
        Ok(())
    }

    #[test]
    fn real_archives_pass_whole() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(300) + "file";
        let mut h = tar::Header::new_gnu();
        h.set_size(1000);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &[7u8; 1000][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        b.append_pax_extensions([("size", b"3".as_slice()), ("path", b"p".as_slice())])
            .unwrap();
        b.append_data(&mut h, "x", &b"abc"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        drain(&bytes, Limits::default()).unwrap();
        let e = drain(
            &bytes,
            Limits {
                max_uncompressed: 1000,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--max-uncompressed-size"), "{e}");
    }

    #[test]
    fn a_huge_long_name_member_is_refused_from_its_header() {
        let mut bytes = header("././@LongLink", b'L', 1 << 40);
        bytes.extend_from_slice(&[b'a'; 4096]);
        let e = drain(&bytes, Limits::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("GNU long name of 1099511627776 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_pax_size_override_is_followed() {
        // PAX says the next member has 2000 bytes though its header says 0: the guard must
        // step over 2000 bytes to find the bad long-name header after it.
        let pax = b"13 size=2000\n";
        let mut bytes = header("pax", b'x', pax.len() as u64);
        bytes.extend_from_slice(pax);
        bytes.resize(bytes.len().div_ceil(BLOCK) * BLOCK, 0);
        bytes.extend(header("f", b'0', 0));
        bytes.extend(std::iter::repeat_n(1u8, 2048));
        bytes.extend(header("././@LongLink", b'L', 1 << 30));
        let e = drain(&bytes, Limits::default()).unwrap_err();
        assert!(e.to_string().contains("long name"), "{e}");
    }

    #[test]
    fn too_many_members_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..5 {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            b.append_data(&mut h, format!("f{i}"), &b"x"[..]).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let few = Limits {
            max_members: 4,
            ..Limits::default()
        };
        let e = drain(&bytes, few).unwrap_err();
        assert!(e.to_string().contains("more than 4 tar members"), "{e}");
        drain(
            &bytes,
            Limits {
                max_members: 5,
                ..few
            },
        )
        .unwrap();
    }

    #[test]
    fn base256_and_octal_sizes() {
        assert_eq!(numeric(b"00000001750\0"), Some(1000));
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(numeric(b"  \0"), Some(0));
        assert_eq!(numeric(b"zz"), None);
        assert_eq!(pax_size(b"13 size=2000\n11 path=ab\n"), Some(2000));
        assert_eq!(pax_size(b"garbage"), None);
    }
}
