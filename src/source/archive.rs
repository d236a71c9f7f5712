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

/// Read the archive: find the image `reference` names in its `manifest.json`, locate its
/// config and layers among the members, and synthesise the manifest it lacks.
fn open_blocking(file: PathBuf, reference: Option<String>) -> Result<ArchiveSource> {
    let name = match &reference {
        Some(r) => format!("docker-archive:{}:{r}", file.display()),
        None => format!("docker-archive:{}", file.display()),
    };
    let bad = |reason: String| malformed(&file, reason);
    let f = File::open(&file).ctx(|| format!("opening {}", file.display()))?;
    let mut members = Members::scan(&file, f)?;

    let entries: Vec<Entry> = serde_json::from_slice(&members.read("manifest.json")?)
        .map_err(|e| bad(format!("manifest.json: {e}")))?;
    let entry = pick(&entries, reference.as_deref()).map_err(bad)?;
    let raw_config = members.read(&entry.config)?;
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
    let (coff, csize) = members.at[&normalize(&entry.config)];
    blobs.insert(config_digest.clone(), (coff, csize));
    let mut layers = Vec::new();
    for (member, diff_id) in entry.layers.iter().zip(&diff_ids) {
        let (off, size) = *members
            .at
            .get(&normalize(member))
            .ok_or_else(|| bad(format!("layer {member} is missing")))?;
        let layer = members.layer(member, diff_id, off, size)?;
        // A digest met twice is the same blob; keep the first (real) copy.
        blobs
            .entry(layer.descriptor.digest.clone())
            .or_insert((off, size));
        layers.push(layer);
    }

    let image = synthesize_image(name, raw_config, config_digest, probe.platform(), layers);
    Ok(ArchiveSource {
        file,
        reference,
        blobs,
        image,
    })
}

/// The error for an archive that is not what `docker save` writes.
fn malformed(file: &Path, reason: String) -> Error {
    Error::malformed(format!("docker archive {}", file.display()), reason)
}

/// The archive's open file and where each member's data lies in it.
struct Members<'a> {
    path: &'a Path,
    f: File,
    /// Member name (normalised) → (data offset, size); links resolved to their target's data.
    at: HashMap<String, (u64, u64)>,
}

impl<'a> Members<'a> {
    /// Index the members of tar `f`. Older `docker save` stores a layer that appears twice as
    /// a symlink to the first copy; links are followed to their target.
    fn scan(path: &'a Path, mut f: File) -> Result<Self> {
        let bad = |reason: String| malformed(path, reason);
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
                        links.insert(key.clone(), link_target(&entry, &key));
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
        Ok(Members {
            path,
            f,
            at: members,
        })
    }

    /// The whole of member `n`: for the small JSON files (manifest, config), so its size is
    /// bounded.
    fn read(&mut self, n: &str) -> Result<Vec<u8>> {
        let (off, size) = *self
            .at
            .get(&normalize(n))
            .ok_or_else(|| malformed(self.path, format!("{n} is missing")))?;
        if size > 64 << 20 {
            return Err(malformed(
                self.path,
                format!("{n} is implausibly large ({size} bytes)"),
            ));
        }
        let mut buf = vec![0; size as usize];
        let f = &mut self.f;
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut buf))
            .ctx(|| format!("reading {n} from {}", self.path.display()))?;
        Ok(buf)
    }

    /// The layer in `member` (at `off`, `size` bytes) whose uncompressed digest is `diff_id`:
    /// its compression sniffed from its first bytes, its digest found without hashing where
    /// the archive tells it.
    fn layer(&mut self, member: &str, diff_id: &Digest, off: u64, size: u64) -> Result<Layer> {
        let f = &mut self.f;
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
            None => hash_range(f, off, size).ctx(|| format!("hashing {member}"))?,
        };
        Ok(Layer {
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
        })
    }
}

/// Where link `entry`, member `key`, points, as a member name: a symlink is relative to its
/// own directory, a hard link names a member. An unreadable target is the empty name, which
/// matches no member.
fn link_target<R: Read>(entry: &tar::Entry<R>, key: &str) -> String {
    let target = entry
        .link_name()
        .ok()
        .flatten()
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_default();
    if entry.header().entry_type() == tar::EntryType::Symlink {
        let dir = key.rsplit_once('/').map_or("", |(d, _)| d);
        crate::index::normalize(format!("{dir}/{target}").as_bytes())
            .map(|p| p.to_str_lossy().into_owned())
            .unwrap_or_default()
    } else {
        normalize(&target)
    }
}

/// The image of an archive: a Docker schema 2 manifest made from its config and layers,
/// serialised the same way every time so the same archive gives the same manifest digest.
fn synthesize_image(
    name: String,
    raw_config: Vec<u8>,
    config_digest: Digest,
    platform: manifest::Platform,
    layers: Vec<Layer>,
) -> Image {
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
    Image {
        reference: name,
        manifest_digest: Digest::of(&raw_manifest),
        manifest_media_type: media::DOCKER_MANIFEST.into(),
        raw_manifest,
        index_digest: None,
        config: Some(config),
        raw_config,
        platform,
        layers,
    }
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
