//! Layer blobs as tar streams: undo gzip or zstd (or nothing) on a verified blob from the cache.
//! Random access into compressed layers (seek points) arrives with the mount work.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::manifest::Compression;

/// A reader of the uncompressed tar stream of the blob at `path`.
pub fn open_tar_stream(path: &Path, compression: Compression) -> Result<Box<dyn Read + Send>> {
    let file = File::open(path).ctx(|| format!("opening layer blob {}", path.display()))?;
    let buffered = BufReader::with_capacity(256 << 10, file);
    Ok(match compression {
        Compression::None => Box::new(buffered),
        // Layers may hold several gzip members (pigz, eStargz): read them all.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .ctx(|| format!("starting zstd on {}", path.display()))?,
        ),
    })
}
