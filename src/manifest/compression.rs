//! How a layer blob is compressed, from its media type (foreign layer types included) or,
//! for sources that say nothing, from its first bytes.

use std::fmt;

use serde::Serialize;

use super::media;

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type; `None` when the type is not a layer type we know.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        match mt {
            media::DOCKER_LAYER_TAR | media::OCI_LAYER_TAR => Some(Compression::None),
            media::DOCKER_LAYER_GZIP | media::OCI_LAYER_GZIP => Some(Compression::Gzip),
            media::OCI_LAYER_ZSTD => Some(Compression::Zstd),
            // Non-distributable ("foreign") variants carry the same compression suffixes.
            _ if mt.ends_with(".tar.gzip") || mt.ends_with("+gzip") => Some(Compression::Gzip),
            _ if mt.ends_with("+zstd") => Some(Compression::Zstd),
            _ if mt.ends_with(".tar") || mt.ends_with(".rootfs.diff.tar") => {
                Some(Compression::None)
            }
            _ => None,
        }
    }

    /// From the first bytes of a blob.
    pub fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}
