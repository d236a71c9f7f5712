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
///
/// It must step from member to member exactly as the `tar` crate (0.4.46) does, or a crafted
/// stream could show it one member while the crate reads another: so headers are read with
/// the crate's own parsers (`Header::entry_size`, its magic checks, `PaxExtensions`), and the
/// crate's rules are followed — only GNU/ustar headers of type `L`, `K` or `x` describe the
/// next member; a PAX `size` (the first, if the records parse) overrides the size of the next
/// header that is not itself an extension header; any other header consumes what was pending;
/// an all-zero block ends the archive; old-GNU sparse extension blocks follow while their
/// flag byte is 1.
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
    /// The data of the PAX member being read.
    pax_reading: Option<Vec<u8>>,
    /// A complete PAX member waiting for the member it describes.
    pax_pending: Option<Vec<u8>>,
    /// Old-GNU sparse: extension header blocks still to come before the data of this size.
    sparse_ext: Option<u64>,
    /// The archive ended (all-zero block): the tar crate reads no further headers.
    ended: bool,
}

fn refuse(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// The `size` a PAX member sets, read as the `tar` crate reads it (`pax_extensions_value`):
/// the first `size` record; nothing if a record before it is malformed or the value is not a
/// number.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse().ok();
    }
    None
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
            pax_reading: None,
            pax_pending: None,
            sparse_ext: None,
            ended: false,
        }
    }

    fn start_data(&mut self, size: u64) {
        self.data_left = size;
        self.pad_left = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if size == 0
            && let Some(p) = self.pax_reading.take()
        {
            self.pax_pending = Some(p);
        }
    }

    /// A whole header block has arrived.
    fn header(&mut self) -> std::io::Result<()> {
        if let Some(size) = self.sparse_ext {
            if self.block[504] != 1 {
                self.sparse_ext = None;
                self.start_data(size);
            }
            return Ok(());
        }
        if self.block.iter().all(|&x| x == 0) {
            self.ended = true;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&self.block);
        let kind = h.entry_type();
        let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        // Read by the crate as describing the next member (and held in memory).
        let describes_next = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        self.members += 1;
        if self.members > self.limits.max_members {
            return Err(refuse(format!(
                "the layer has more than {} tar members",
                self.limits.max_members
            )));
        }
        // The crate fails on a size it cannot read: so does the guard, rather than guess.
        let mut size = h
            .entry_size()
            .map_err(|e| refuse(format!("tar member {}: {e}", self.members)))?;
        if !extension && let Some(s) = self.pax_pending.as_deref().and_then(pax_size) {
            size = s;
        }
        if !describes_next {
            self.pax_pending = None;
        }
        if describes_next && size > MAX_META_MEMBER {
            let what = if kind.is_gnu_longname() {
                "a GNU long name"
            } else if kind.is_gnu_longlink() {
                "a GNU long link target"
            } else {
                "a PAX header"
            };
            return Err(refuse(format!(
                "{what} of {size} bytes in tar member {} (at most {MAX_META_MEMBER} are accepted)",
                self.members
            )));
        }
        if describes_next && kind.is_pax_local_extensions() {
            self.pax_reading = Some(Vec::with_capacity(size as usize));
        }
        if !describes_next && kind.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended()) {
            self.sparse_ext = Some(size);
            return Ok(());
        }
        self.start_data(size);
        Ok(())
    }

    /// Follow the stream through `bytes`.
    fn follow(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() && !self.ended {
            if self.data_left > 0 {
                let n = (self.data_left.min(bytes.len() as u64)) as usize;
                if let Some(p) = &mut self.pax_reading {
                    p.extend_from_slice(&bytes[..n]);
                }
                self.data_left -= n as u64;
                bytes = &bytes[n..];
                if self.data_left == 0
                    && let Some(p) = self.pax_reading.take()
                {
                    self.pax_pending = Some(p);
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

    /// `kind` header claiming `size`, with its size field replaced by `field` if given.
    fn raw_header(name: &str, kind: u8, size: u64, field: Option<[u8; 12]>, gnu: bool) -> Vec<u8> {
        let mut h = if gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_old()
        };
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        let mut b = h.as_bytes().to_vec();
        if let Some(f) = field {
            b[124..136].copy_from_slice(&f);
        }
        let mut h = tar::Header::from_byte_slice(&b).clone();
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pax_member(records: &[u8], gnu: bool) -> Vec<u8> {
        let mut b = raw_header("pax", b'x', records.len() as u64, None, gnu);
        b.extend_from_slice(records);
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    /// 32 MiB claimed by a long-name header: the guard must see it whatever came before.
    fn big_long_name() -> Vec<u8> {
        raw_header("././@LongLink", b'L', 32 << 20, None, true)
    }

    fn refuses_long_name(stream: &[u8], what: &str) {
        let e = drain(stream, Limits::default())
            .expect_err(what)
            .to_string();
        assert!(e.contains("long name"), "{what}: {e}");
    }

    #[test]
    fn size_fields_are_read_as_the_tar_crate_reads_them() {
        // Octal cut at the first NUL, junk after it.
        let mut octal = [0u8; 12];
        octal[..9].copy_from_slice(b"200000000");
        octal[10] = b'x';
        refuses_long_name(
            &raw_header("././@LongLink", b'L', 0, Some(octal), true),
            "octal with junk after a NUL",
        );
        // Base-256 reads only the last 8 bytes: junk in the first 4.
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[1..4].copy_from_slice(&[0xff; 3]);
        b256[8..12].copy_from_slice(&(32u32 << 20).to_be_bytes());
        refuses_long_name(
            &raw_header("././@LongLink", b'L', 0, Some(b256), true),
            "base-256 with junk in the high bytes",
        );
        // A size the crate cannot read fails the stream instead of losing the guard.
        let bad = raw_header("f", b'0', 0, Some(*b"zzzzzzzzzzz\0"), true);
        assert!(drain(&bad, Limits::default()).is_err());
    }

    #[test]
    fn pax_members_describe_the_next_member_as_the_crate_says() {
        // The first size record wins: 0 here, so the long name right after is a header.
        let mut s = pax_member(b"10 size=0\n13 size=2000\n", true);
        s.extend(raw_header("f", b'0', 2000, None, true));
        s.extend(big_long_name());
        // (with size 2000 the guard would skip the long-name header as data)
        refuses_long_name(&s, "the first PAX size record");
        let mut pax_first = pax_member(b"10 size=0\n", true);
        pax_first.extend(raw_header("f", b'0', 0, None, true));
        pax_first.extend(big_long_name());
        refuses_long_name(&pax_first, "PAX size 0 applied");
        // A `g` header consumes a pending PAX member: the next member keeps its own size.
        let mut g = pax_member(b"13 size=2000\n", true);
        g.extend(raw_header("g", b'g', 0, None, true));
        g.extend(raw_header("f", b'0', 0, None, true));
        g.extend(big_long_name());
        refuses_long_name(&g, "x, then g");
        // An `x` without GNU/ustar magic is an ordinary member to the crate.
        let mut old = pax_member(b"13 size=2000\n", false);
        old.extend(raw_header("f", b'0', 0, None, true));
        old.extend(big_long_name());
        refuses_long_name(&old, "x without magic");
    }

    #[test]
    fn an_empty_pax_member_does_not_collect_what_follows() {
        let mut s = pax_member(b"", true);
        s.extend(raw_header("f", b'0', 1 << 20, None, true));
        s.extend(std::iter::repeat_n(0u8, 1 << 20));
        let mut g = TarGuard::new(&s[..], Limits::default());
        std::io::copy(&mut g, &mut std::io::sink()).unwrap();
        assert!(g.pax_reading.is_none());
        assert!(g.pax_pending.as_ref().is_none_or(|p| p.is_empty()));
    }

    #[test]
    fn sparse_extension_blocks_follow_only_while_their_flag_is_one() {
        // Flag byte 2 is "not extended" to the crate: the next block is a header.
        let mut h = raw_header("s", b'S', 0, None, true);
        h[482] = 2;
        let h = {
            let mut hh = tar::Header::from_byte_slice(&h).clone();
            hh.set_cksum();
            hh.as_bytes().to_vec()
        };
        let mut s = h;
        s.extend(big_long_name());
        refuses_long_name(&s, "sparse flag 2");
    }

    #[test]
    fn pax_size_reads_like_the_crate() {
        assert_eq!(pax_size(b"13 size=2000\n11 path=ab\n"), Some(2000));
        assert_eq!(
            pax_size(b"11 path=ab\n13 size=2000\n10 size=5\n"),
            Some(2000)
        );
        assert_eq!(pax_size(b"9 bad=x\n13 size=2000\n"), None);
        assert_eq!(pax_size(b"garbage"), None);
    }
}
