//! The user's config file: `$IMGFS_CONFIG`, else `$XDG_CONFIG_HOME/imgfs/config.toml`
//! (`~/.config/imgfs/config.toml`). Only what cannot sensibly be typed every time lives here:
//!
//! ```toml
//! # Tried in order before the registry for blobs, indexes and manifests by digest.
//! [mirrors]
//! "docker.io" = ["mirror.internal:5000"]
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Registry name as in references (`docker.io`, `host:5000`) → mirror hosts.
    #[serde(default)]
    pub mirrors: HashMap<String, Vec<String>>,
}

fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IMGFS_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("imgfs/config.toml"))
}

/// The config, or the defaults when there is no file. A file that exists but does not parse
/// is an error: silently ignoring a typo'd mirror would be worse.
pub fn load() -> Result<Config> {
    let Some(path) = path() else {
        return Ok(Config::default());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    toml::from_str(&text).with_context(|| format!("{} is not a valid imgfs config", path.display()))
}
