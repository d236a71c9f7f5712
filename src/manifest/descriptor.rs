//! The content descriptor: how OCI and Docker schema 2 manifests, indexes and manifest lists
//! all point at a blob. One tolerant type for all of them (fields registries add are
//! ignored), serialised back only for manifests imgfs writes itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::platform::Platform;
use crate::digest::Digest;

/// A content descriptor as OCI and Docker schema 2 both write it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Schema 1 records no sizes: `size` is then 0 and means "unknown" (and a fetch is capped
    /// instead). Everywhere else `size` is exact, 0 included.
    #[serde(skip)]
    pub size_unknown: bool,
}
