//! Content digests (`sha256:<hex>`) and the hasher that checks bytes against them, and the
//! BLAKE3 digests a layer index records for each span of its blob ([`SpanDigest`]).
//!
//! Every byte imgfs trusts has passed through a hasher and been compared with the digest
//! that named it; a [`Digest`] is always well-formed once constructed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A validated `sha256:` digest. Other algorithms are refused at parse time: the registries
/// we talk to, and the OCI spec's "SHOULD", use sha256 only.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parse `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest> {
        let bad = |reason: &str| Error::Digest {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| bad("expected ALGORITHM:HEX"))?;
        if algo != "sha256" {
            return Err(bad("only sha256 digests are supported"));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("sha256 needs 64 lowercase hex digits"));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new();
        h.update(bytes);
        h.finish()
    }

    /// The hex part, which names the blob on disk.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for progress lines and tables.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    /// Check `bytes` against this digest; `what` names the object in the error.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != self {
            return Err(Error::DigestMismatch {
                what: what.to_string(),
                expected: self.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 over a stream of chunks.
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> Digest {
        Digest(format!("sha256:{}", hex::encode(self.0.finalize())))
    }
}

/// The BLAKE3 digest of one span of a layer blob: what a layer index records, while it is
/// built from the verified blob, for every stretch of compressed bytes between two seek
/// points, and what a span fetched by range must match before it is used.
///
/// Why not SHA-256 like every other digest here: span digests are imgfs's own (no
/// registry or spec names spans), and they are on the two hot paths. Indexing hashes every
/// byte of a layer twice (the blob's own SHA-256, which the manifest fixes, and the spans),
/// and reading by range hashes every byte fetched. BLAKE3 is as strong for this use and, on
/// the bench machine, 3.9x faster than SHA-256 with SHA-NI (7.4 against 1.9 GB/s).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SpanDigest(pub [u8; 32]);

impl SpanDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> SpanDigest {
        SpanDigest(*blake3::hash(bytes).as_bytes())
    }

    /// The digest a hasher fed a span has reached.
    pub fn of_hasher(h: &blake3::Hasher) -> SpanDigest {
        SpanDigest(*h.finalize().as_bytes())
    }

    /// The hex digits, which name a stored span on disk.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for SpanDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.hex())
    }
}

impl fmt::Debug for SpanDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_of_empty_input() {
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "sha256:abc",
            "md5:e3b0c44298fc1c149afbf4c8996fb924",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        ] {
            let err = Digest::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn span_digests_are_blake3() {
        // The BLAKE3 test vector for empty input.
        assert_eq!(
            SpanDigest::of(b"").to_string(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let mut h = blake3::Hasher::new();
        h.update(b"sp");
        h.update(b"an");
        assert_eq!(SpanDigest::of_hasher(&h), SpanDigest::of(b"span"));
    }

    #[test]
    fn verify_names_both_digests_on_mismatch() {
        let d = Digest::of(b"right");
        let err = d.verify("blob", b"wrong").unwrap_err().to_string();
        assert!(err.contains(d.as_str()) && err.contains(Digest::of(b"wrong").as_str()));
    }
}
