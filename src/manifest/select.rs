//! Choosing one image of an index for a platform, and saying which platforms it offers when
//! none fits (attestations and other non-image entries are never chosen nor listed).

use super::descriptor::Descriptor;
use super::platform::Platform;
use crate::error::{Error, Result};

/// Pick the entry of an index for `wanted`. Attestation and other non-image entries
/// (platform `unknown/unknown`) are never chosen nor listed.
pub fn select_platform<'a>(
    reference: &str,
    manifests: &'a [Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor> {
    let images: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.os != "unknown"))
        .collect();
    let candidates: Vec<&&Descriptor> = images
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.matches(wanted)))
        .collect();
    // Prefer an exact variant match when the user gave none (e.g. arm/v7 over arm/v6 on v7).
    let host_variant = Platform::host();
    let best = candidates
        .iter()
        .find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                wanted.variant.is_some()
                    || p.normalized_variant() == host_variant.normalized_variant()
            })
        })
        .or(candidates.first());
    best.map(|d| **d).ok_or_else(|| Error::NoMatchingPlatform {
        reference: reference.to_string(),
        wanted: wanted.to_string(),
        available: offered_platforms(images.iter().filter_map(|d| d.platform.as_ref())),
    })
}

/// How many platforms a "no image for platform" error lists.
const OFFERED_MAX: usize = 20;

/// The distinct platforms an index offers, in its order, for an error message: at most
/// [`OFFERED_MAX`] and then "and N more" — an index of thousands of entries once made a
/// one-line error of 31 KB.
fn offered_platforms<'a>(platforms: impl Iterator<Item = &'a Platform>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<String> = platforms
        .map(|p| p.to_string())
        .filter(|p| seen.insert(p.clone()))
        .collect();
    let more = distinct.len().saturating_sub(OFFERED_MAX);
    let mut shown: Vec<String> = distinct.into_iter().take(OFFERED_MAX).collect();
    if more > 0 {
        shown.push(format!("and {more} more"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Parsed, media, parse};

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn index_selection_lists_available_platforms() {
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            d(1),
            media::OCI_MANIFEST,
            d(2),
            media::OCI_MANIFEST,
            d(3)
        );
        let Parsed::Index { manifests } = parse(raw.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let arm = select_platform("x", &manifests, &Platform::parse("linux/arm64").unwrap());
        assert_eq!(arm.unwrap().digest.to_string(), d(2));
        let err = select_platform("x", &manifests, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/s390x"), "{err}");
        assert!(err.contains("linux/amd64, linux/arm64/v8"), "{err}");
        assert!(!err.contains("unknown"), "{err}");
    }

    #[test]
    fn a_huge_index_lists_a_few_distinct_platforms() {
        // 2,000 entries over 50 platforms, each listed 40 times.
        let entries: Vec<String> = (0..2000)
            .map(|i| {
                format!(
                    r#"{{"mediaType":"{}","digest":"sha256:{i:064x}","size":1,"platform":{{"os":"linux","architecture":"arch{}"}}}}"#,
                    media::OCI_MANIFEST,
                    i % 50
                )
            })
            .collect();
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{}]}}"#,
            media::OCI_INDEX,
            entries.join(",")
        );
        let Parsed::Index { manifests } = parse(raw.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let err = select_platform("x", &manifests, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.len() < 600, "{} bytes: {err}", err.len());
        assert!(err.contains("linux/arch0, linux/arch1, "), "{err}");
        assert!(err.contains("linux/arch19, and 30 more"), "{err}");
        assert!(!err.contains("linux/arch20"), "{err}");
    }
}
