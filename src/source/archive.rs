//! A `docker save` tarball. It has no registry manifest, only `manifest.json` naming a config
//! and layer files, so imgfs synthesises a Docker schema 2 manifest for it (deterministically:
//! the same archive always gives the same manifest digest). Blobs are read in place, at the
//! offsets of their tar members: nothing is extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{BlobStream, file_range_stream, missing_blob};
use bstr::ByteSlice;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{self, Compression, ConfigProbe, Image, Layer, media};
use crate::reference::RegistryRef;

pub struct ArchiveSource {
    file: PathBuf,
    reference: Option<String>,
    /// Digest → (offset, size) of the tar member holding it.
    blobs: HashMap<Digest, (u64, u64)>,
    image: Image,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl ArchiveSource {
    pub async fn open(file: &Path, reference: Option<String>) -> Result<ArchiveSource> {
        let (file, r) = (file.to_path_buf(), reference.clone());
        tokio::task::spawn_blocking(move || open_blocking(file, r))
            .await
            .map_err(|e| Error::malformed("docker archive", format!("reader failed: {e}")))?
    }

    pub fn name(&self) -> String {
        match &self.reference {
            Some(r) => format!("docker-archive:{}:{r}", self.file.display()),
            None => format!("docker-archive:{}", self.file.display()),
        }
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub async fn open_blob(&self, d: &Digest, offset: u64) -> Result<BlobStream> {
        let (start, size) = *self
            .blobs
            .get(d)
            .ok_or_else(|| missing_blob(&self.name(), d))?;
        let mut s = file_range_stream(
            &self.file,
            start + offset.min(size),
            size.saturating_sub(offset),
        )
        .await
        .ctx(|| format!("reading {}", self.file.display()))?;
        s.start = offset.min(size);
        Ok(s)
    }
}

fn open_blocking(file: PathBuf, reference: Option<String>) -> Result<ArchiveSource> {
    let name = match &reference {
        Some(r) => format!("docker-archive:{}:{r}", file.display()),
        None => format!("docker-archive:{}", file.display()),
    };
    let bad =
        |reason: String| Error::malformed(format!("docker archive {}", file.display()), reason);
    let mut f = File::open(&file).ctx(|| format!("opening {}", file.display()))?;

    // Index the members: name → (data offset, size). Older `docker save` stores a layer that
    // appears twice as a symlink to the first copy; links are followed to their target.
    let mut members: HashMap<String, (u64, u64)> = HashMap::new();
    let mut links: HashMap<String, String> = HashMap::new();
    {
        let mut ar = tar::Archive::new(&mut f);
        let entries = ar
            .entries()
            .map_err(|e| bad(format!("not a tar file: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(format!("bad tar entry: {e}")))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?;
            let key = normalize(&path.to_string_lossy());
            match entry.header().entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let target = if entry.header().entry_type() == tar::EntryType::Symlink {
                        let dir = key.rsplit_once('/').map_or("", |(d, _)| d);
                        crate::index::normalize(format!("{dir}/{target}").as_bytes())
                            .map(|p| p.to_str_lossy().into_owned())
                            .unwrap_or_default()
                    } else {
                        normalize(&target)
                    };
                    links.insert(key, target);
                }
                _ => {
                    members.insert(key, (entry.raw_file_position(), entry.size()));
                }
            }
        }
    }
    let resolve = |mut name: String| -> Option<(u64, u64)> {
        for _ in 0..8 {
            if let Some(&m) = members.get(&name) {
                return Some(m);
            }
            name = links.get(&name)?.clone();
        }
        None
    };
    let resolved: Vec<(String, (u64, u64))> = links
        .keys()
        .filter_map(|a| resolve(a.clone()).map(|m| (a.clone(), m)))
        .collect();
    members.extend(resolved);
    let mut read_member = |n: &str| -> Result<Vec<u8>> {
        let (off, size) = *members
            .get(&normalize(n))
            .ok_or_else(|| bad(format!("{n} is missing")))?;
        if size > 64 << 20 {
            return Err(bad(format!("{n} is implausibly large ({size} bytes)")));
        }
        let mut buf = vec![0; size as usize];
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut buf))
            .ctx(|| format!("reading {n} from {}", file.display()))?;
        Ok(buf)
    };

    let entries: Vec<Entry> = serde_json::from_slice(&read_member("manifest.json")?)
        .map_err(|e| bad(format!("manifest.json: {e}")))?;
    let entry = pick(&entries, reference.as_deref()).map_err(bad)?;
    let raw_config = read_member(&entry.config)?;
    let config_digest = Digest::of(&raw_config);
    let probe = ConfigProbe::parse(&raw_config)?;
    let diff_ids = probe
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(format!(
            "manifest.json lists {} layers but the config has {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }

    let mut blobs = HashMap::new();
    let (coff, csize) = members[&normalize(&entry.config)];
    blobs.insert(config_digest.clone(), (coff, csize));
    let mut layers = Vec::new();
    for (member, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let (off, size) = *members
            .get(&normalize(member))
            .ok_or_else(|| bad(format!("layer {member} is missing")))?;
        let mut head = [0u8; 4];
        let n = size.min(4) as usize;
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut head[..n]))
            .ctx(|| format!("reading {member}"))?;
        let compression = Compression::sniff(&head[..n]);
        // The digest is named by the member (newer `docker save`), or is the diff_id of an
        // uncompressed layer; otherwise only hashing the member tells it.
        let digest = match member.strip_prefix("blobs/sha256/") {
            Some(hex) => Digest::parse(&format!("sha256:{hex}"))?,
            None if compression == Compression::None => diff_id.clone(),
            None => hash_range(&mut f, off, size).ctx(|| format!("hashing {member}"))?,
        };
        // A digest met twice is the same blob; keep the first (real) copy.
        blobs.entry(digest.clone()).or_insert((off, size));
        layers.push(Layer {
            descriptor: manifest::Descriptor {
                media_type: match compression {
                    Compression::None => media::DOCKER_LAYER_TAR,
                    Compression::Gzip => media::DOCKER_LAYER_GZIP,
                    Compression::Zstd => media::OCI_LAYER_ZSTD,
                }
                .to_string(),
                digest,
                size,
                urls: vec![],
                annotations: Default::default(),
                platform: None,
                size_unknown: false,
            },
            compression,
            diff_id: Some(diff_id.clone()),
        });
    }

    let config = manifest::Descriptor {
        media_type: media::DOCKER_CONFIG.into(),
        digest: config_digest,
        size: raw_config.len() as u64,
        urls: vec![],
        annotations: Default::default(),
        platform: None,
        size_unknown: false,
    };
    let raw_manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::DOCKER_MANIFEST,
        "config": config,
        "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
    }))
    .expect("serialising a manifest cannot fail");
    let image = Image {
        reference: name,
        manifest_digest: Digest::of(&raw_manifest),
        manifest_media_type: media::DOCKER_MANIFEST.into(),
        raw_manifest,
        index_digest: None,
        config: Some(config),
        raw_config,
        platform: probe.platform(),
        layers,
    };
    Ok(ArchiveSource {
        file,
        reference,
        blobs,
        image,
    })
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

/// The entry for `reference` (matched after normalising both sides), or the only entry.
fn pick<'a>(entries: &'a [Entry], reference: Option<&str>) -> Result<&'a Entry, String> {
    let tags = |e: &Entry| e.repo_tags.clone().unwrap_or_default();
    let all_tags = entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ");
    match reference {
        None if entries.len() == 1 => Ok(&entries[0]),
        None => Err(format!(
            "it holds {} images; name one with docker-archive:FILE:REF (tags: {all_tags})",
            entries.len()
        )),
        Some(r) => {
            let norm = |s: &str| RegistryRef::parse(s).map(|x| x.to_string()).ok();
            let want = norm(r);
            entries
                .iter()
                .find(|e| {
                    tags(e)
                        .iter()
                        .any(|t| t == r || (want.is_some() && norm(t) == want))
                })
                .ok_or_else(|| format!("no image tagged {r:?} (tags: {all_tags})"))
        }
    }
}

fn hash_range(f: &mut File, off: u64, size: u64) -> std::io::Result<Digest> {
    f.seek(SeekFrom::Start(off))?;
    let mut h = Hasher::new();
    let mut take = f.take(size);
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = take.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}
