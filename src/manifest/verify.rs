//! Which digest names a manifest, and checking a manifest against it. Usually the digest of
//! the bytes; for a signed schema 1 manifest, that of its payload without the signatures,
//! cut only where the cut cannot make one manifest pass for another.

use base64::Engine as _;
use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The digest a registry gives a manifest. For a signed schema 1 manifest that is the digest
/// of the payload without its signatures (the JWS "protected" header says how to cut it) —
/// but only when the received document *is* that payload plus its `signatures`: the cut is
/// chosen by the sender, so the payload must be a schema 1 manifest equal, as JSON, to what
/// will be parsed. Otherwise the digest is that of the bytes received.
pub fn manifest_digest(raw: &[u8]) -> Digest {
    schema1_payload(raw)
        .map(|p| Digest::of(&p))
        .unwrap_or_else(|| Digest::of(raw))
}

fn schema1_payload(raw: &[u8]) -> Option<Vec<u8>> {
    #[derive(Deserialize)]
    struct Signed {
        signatures: Vec<Sig>,
    }
    #[derive(Deserialize)]
    struct Sig {
        protected: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Protected {
        format_length: usize,
        format_tail: String,
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed: Signed = serde_json::from_slice(raw).ok()?;
    let prot = b64
        .decode(signed.signatures.first()?.protected.trim_end_matches('='))
        .ok()?;
    let prot: Protected = serde_json::from_slice(&prot).ok()?;
    let tail = b64.decode(prot.format_tail.trim_end_matches('=')).ok()?;
    let mut payload = raw.get(..prot.format_length)?.to_vec();
    payload.extend_from_slice(&tail);
    let mut whole: serde_json::Value = serde_json::from_slice(raw).ok()?;
    whole.as_object_mut()?.remove("signatures")?;
    let cut: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    (whole == cut && cut.get("schemaVersion") == Some(&serde_json::json!(1))).then_some(payload)
}

/// Verify that `raw` is the manifest named by `digest`.
pub fn verify_manifest(digest: &Digest, raw: &[u8]) -> Result<()> {
    let actual = manifest_digest(raw);
    if &actual != digest {
        return Err(Error::DigestMismatch {
            what: "manifest".into(),
            expected: digest.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn a_forged_signature_cut_cannot_make_one_manifest_pass_for_another() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let pinned = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
        let protected = serde_json::json!({
            "formatLength": 1,
            "formatTail": b64.encode(&pinned[1..]),
        });
        let forged = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":1}},"layers":[],"signatures":[{{"protected":"{}"}}]}}"#,
            d(9),
            b64.encode(protected.to_string())
        );
        let pinned_digest = Digest::of(pinned);
        assert!(verify_manifest(&pinned_digest, forged.as_bytes()).is_err());
        assert_eq!(
            manifest_digest(forged.as_bytes()),
            Digest::of(forged.as_bytes())
        );
    }
}
