//! The few fields of an image config imgfs reads: its platform and its layers' diff ids.
//! The config's bytes themselves are kept as received.

use serde::Deserialize;

use super::platform::Platform;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The fields of an image config imgfs reads.
#[derive(Deserialize, Default)]
pub struct ConfigProbe {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ConfigProbe {
    pub fn parse(raw: &[u8]) -> Result<ConfigProbe> {
        serde_json::from_slice(raw).map_err(|e| Error::malformed("image config", e))
    }
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}
