//! Which layer a Prepare asks for, from the labels containerd passes through: the target
//! snapshot name (`containerd.io/snapshot.ref`, set by every unpacker) and the image and
//! layer, as containerd's CRI plugin labels them (`cri.*`, with
//! `disable_snapshot_annotations = false`) or as `ctr-remote image rpull` does
//! (`remote/stargz.*`). docs/snapshotter-research.md, section 3.

use std::collections::HashMap;

pub const TARGET: &str = "containerd.io/snapshot.ref";
const CRI_REF: &str = "containerd.io/snapshot/cri.image-ref";
const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
const STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
const STARGZ_LAYER: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Set on the snapshots this daemon serves lazily, as stargz-snapshotter sets it, so that
/// tools listing snapshots can tell them apart.
pub const REMOTE: &str = "containerd.io/snapshot/remote";

/// A layer containerd would unpack into the snapshot `name`.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// What to ask for: pinned to the manifest digest when CRI gave one (a tag may move).
    pub reference: String,
    pub layer: String,
}

/// What the labels ask for: nothing (not an unpack), a layer, or an unpack whose labels do
/// not say which image it is (counted as a fallback with this reason).
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    Nothing,
    Layer(Target),
    Unnamed(&'static str),
}

/// What the Prepare of `key` with `labels` asks for.
pub fn ask(key: &str, labels: &HashMap<String, String>) -> Ask {
    let Some(name) = labels.get(TARGET).filter(|n| !n.is_empty()) else {
        // containerd names every unpack's snapshot "extract-<unique> <chain id>"; one
        // without a target (`ctr image pull`, containerd's rootfs.ApplyLayers) applies a
        // layer containerd has already downloaded.
        if key
            .split('/')
            .next_back()
            .is_some_and(|k| k.starts_with("extract-"))
        {
            return Ask::Unnamed(
                "the unpack names no target snapshot (`ctr image pull` downloads first; \
                 `ctr-remote image rpull` or CRI with disable_snapshot_annotations = false \
                 ask for lazy layers)",
            );
        }
        return Ask::Nothing;
    };
    let get = |k: &str| labels.get(k).filter(|v| !v.is_empty());
    let (reference, layer) = if let (Some(r), Some(l)) = (get(CRI_REF), get(CRI_LAYER)) {
        let pinned = match get(CRI_MANIFEST) {
            Some(m) if !r.contains('@') => format!("{r}@{m}"),
            _ => r.clone(),
        };
        (pinned, l.clone())
    } else if let (Some(r), Some(l)) = (get(STARGZ_REF), get(STARGZ_LAYER)) {
        (r.clone(), l.clone())
    } else {
        return Ask::Unnamed(
            "no image reference and layer digest in the labels (CRI needs \
             disable_snapshot_annotations = false; ctr needs ctr-remote rpull)",
        );
    };
    Ask::Layer(Target {
        name: name.clone(),
        reference,
        layer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_labels_pin_the_manifest() {
        let a = ask(
            "k",
            &labels(&[
                (TARGET, "sha256:chain"),
                (CRI_REF, "reg/img:1"),
                (CRI_LAYER, "sha256:l"),
                (CRI_MANIFEST, "sha256:m"),
            ]),
        );
        assert_eq!(
            a,
            Ask::Layer(Target {
                name: "sha256:chain".into(),
                reference: "reg/img:1@sha256:m".into(),
                layer: "sha256:l".into()
            })
        );
    }

    #[test]
    fn stargz_labels_and_missing_ones() {
        let a = ask(
            "k",
            &labels(&[
                (TARGET, "c"),
                (STARGZ_REF, "reg/img:1"),
                (STARGZ_LAYER, "sha256:l"),
            ]),
        );
        assert!(matches!(a, Ask::Layer(t) if t.reference == "reg/img:1"));
        assert_eq!(
            ask("container", &labels(&[(STARGZ_REF, "r")])),
            Ask::Nothing
        );
        assert!(matches!(
            ask("k", &labels(&[(TARGET, "c"), (CRI_REF, "r")])),
            Ask::Unnamed(_)
        ));
        assert!(matches!(
            ask("default/4/extract-1-x sha256:c", &labels(&[])),
            Ask::Unnamed(_)
        ));
    }
}
