//! Access profiles: which spans and TOC chunks a workload read, in the order it first read
//! them, so that a later mount can fetch them all at once, in parallel, before they are
//! asked for (`imgfs mount --record-profile`, `index push --profile`, `mount --profile`).
//!
//! A profile is a hint. Each entry names a place in a layer *blob* — the compressed offset
//! where a span (seekable layers) or a chunk (eStargz, zstd:chunked) starts — so it stays
//! meaningful whatever index the reader has; a read of it is verified like any other. What
//! does not fit the image at hand (another layer, an offset no span or chunk starts at, a
//! newer version) is passed over. The format is written down in docs/index-artifact.md.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The profile format this imgfs writes and reads.
pub const VERSION: u32 = 1;
/// Media type of a profile blob in an index artifact.
pub const MEDIA_TYPE: &str = "application/vnd.imgfs.profile.v1+json";
/// A profile bigger than this is not one (a million reads is about 20 MB of JSON).
pub const MAX_BYTES: usize = 32 << 20;
/// Reads kept by a recording, and read from a profile: beyond this, a workload has read
/// most of a big image, and fetching it all (`--prefetch all`) is the better tool.
pub const MAX_READS: usize = 1_000_000;

/// A profile: layers by digest and, in the order they were first read, the reads — each
/// a layer (its position in `layers`) and the compressed offset where what was read starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    pub layers: Vec<Digest>,
    pub reads: Vec<(u32, u64)>,
}

impl Profile {
    /// Parse a profile. Fails on what is not a profile of this version; readers log that
    /// and go on without it.
    pub fn parse(bytes: &[u8]) -> Result<Profile> {
        let bad = |reason: String| Error::malformed("access profile", reason);
        if bytes.len() > MAX_BYTES {
            return Err(bad(format!("{} bytes (at most {MAX_BYTES})", bytes.len())));
        }
        // The version first, so that a newer profile is named as such, not as garbage.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a profile: {e}")))?;
        if v.version != VERSION {
            return Err(bad(format!(
                "version {} (this imgfs reads {VERSION})",
                v.version
            )));
        }
        let p: Profile =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a profile: {e}")))?;
        if p.reads.len() > MAX_READS {
            return Err(bad(format!(
                "{} reads (at most {MAX_READS})",
                p.reads.len()
            )));
        }
        Ok(p)
    }

    /// The profile as JSON: deterministic, so the same profile pushed twice is one blob.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialising to memory cannot fail")
    }

    /// The reads of each layer, in profile order, by layer digest. Reads naming no layer
    /// of the list are dropped.
    pub fn by_layer(&self) -> HashMap<&Digest, Vec<u64>> {
        let mut out: HashMap<&Digest, Vec<u64>> = HashMap::new();
        for &(l, at) in &self.reads {
            if let Some(d) = self.layers.get(l as usize) {
                out.entry(d).or_default().push(at);
            }
        }
        out
    }
}

/// Records reads as a mount serves them: each (layer, offset) once, in first-read order.
/// One lock per read, held for a hash lookup: reads run on worker threads, never on FUSE's.
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Recording>);

#[derive(Debug, Default)]
struct Recording {
    profile: Profile,
    layer_ids: HashMap<Digest, u32>,
    seen: HashSet<(u32, u64)>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Note that the span or chunk of `layer` starting at compressed offset `at` was read.
    pub fn record(&self, layer: &Digest, at: u64) {
        let mut r = self.0.lock().unwrap();
        let r = &mut *r;
        if r.profile.reads.len() >= MAX_READS {
            return;
        }
        let id = match r.layer_ids.get(layer) {
            Some(&id) => id,
            None => {
                let id = r.profile.layers.len() as u32;
                r.profile.layers.push(layer.clone());
                r.layer_ids.insert(layer.clone(), id);
                id
            }
        };
        if r.seen.insert((id, at)) {
            r.profile.reads.push((id, at));
        }
    }

    /// How many distinct reads so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().profile.reads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What was recorded so far.
    pub fn profile(&self) -> Profile {
        let mut p = self.0.lock().unwrap().profile.clone();
        p.version = VERSION;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_keeps_first_reads_in_order_and_parses_back() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let r = Recorder::new();
        for (l, at) in [(&a, 10), (&b, 0), (&a, 10), (&a, 5), (&b, 0)] {
            r.record(l, at);
        }
        let p = r.profile();
        assert_eq!(p.layers, vec![a.clone(), b.clone()]);
        assert_eq!(p.reads, vec![(0, 10), (1, 0), (0, 5)]);
        let back = Profile::parse(&p.to_bytes()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.by_layer()[&a], vec![10, 5]);
    }

    #[test]
    fn garbage_and_other_versions_are_refused_by_name() {
        let e = Profile::parse(b"\x00garbage").unwrap_err().to_string();
        assert!(e.contains("not a profile"), "{e}");
        let e = Profile::parse(br#"{"version":2,"layers":[],"reads":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 2"), "{e}");
        let e = Profile::parse(br#"{"version":1,"layers":["sha256:zz"],"reads":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a profile"), "{e}");
    }

    #[test]
    fn reads_naming_no_layer_are_dropped() {
        let p = Profile {
            version: VERSION,
            layers: vec![Digest::of(b"a")],
            reads: vec![(0, 1), (7, 2)],
        };
        let by = p.by_layer();
        assert_eq!(by.len(), 1);
        assert_eq!(by[&Digest::of(b"a")], vec![1]);
    }
}
