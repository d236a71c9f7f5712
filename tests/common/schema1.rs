//! Builds Docker schema 1 manifests signed the way libtrust signs them (a JWS whose protected
//! header says how to cut the payload back out), so that the real registry accepts the push.

use base64::Engine as _;
use serde_json::json;

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// libtrust's key id: base32 of the first 240 bits of sha256(SPKI DER), in groups of four.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    use sha2::Digest as _;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = sha2::Sha256::digest(spki_der);
    let (mut out, mut acc, mut bits) = (String::new(), 0u32, 0);
    for &byte in &hash[..30] {
        acc = (acc << 8) | byte as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

/// Sign pretty-printed manifest JSON (3-space indent, as Docker wrote it) with a fresh key.
pub fn sign(content: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw(); // 0x04 || x || y
    let spki_der = base64::engine::general_purpose::STANDARD
        .decode(
            key.public_key_pem()
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let jwk = json!({
        "crv": "P-256", "kid": libtrust_key_id(&spki_der), "kty": "EC",
        "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65]),
    });
    let close = content.rfind('}').unwrap();
    let format_length = content[..close].trim_end().len();
    let tail = &content[format_length..];
    let protected = b64url(
        json!({"formatLength": format_length, "formatTail": b64url(tail.as_bytes()), "time": "2020-01-01T00:00:00Z"})
            .to_string()
            .as_bytes(),
    );
    let signing_input = format!("{protected}.{}", b64url(content.as_bytes()));
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &enc,
        jsonwebtoken::Algorithm::ES256,
    )
    .unwrap();
    let sigs = json!([{"header": {"jwk": jwk, "alg": "ES256"}, "signature": signature, "protected": protected}]);
    format!(
        "{},\n   \"signatures\": {}{}",
        &content[..format_length],
        serde_json::to_string_pretty(&sigs).unwrap(),
        tail
    )
    .into_bytes()
}

/// A schema 1 manifest body: `layers` newest first, each (blobSum, v1Compatibility JSON).
pub fn manifest(name: &str, tag: &str, layers: &[(String, serde_json::Value)]) -> String {
    let fs_layers: Vec<_> = layers.iter().map(|(d, _)| json!({"blobSum": d})).collect();
    let history: Vec<_> = layers
        .iter()
        .map(|(_, c)| json!({"v1Compatibility": c.to_string()}))
        .collect();
    let doc = json!({
        "schemaVersion": 1, "name": name, "tag": tag, "architecture": "amd64",
        "fsLayers": fs_layers, "history": history,
    });
    // Docker indented with three spaces.
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"   ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    serde::Serialize::serialize(&doc, &mut ser).unwrap();
    String::from_utf8(buf).unwrap()
}
