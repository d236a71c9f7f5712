//! Publishing an image's layer indexes (and an access profile) as an index artifact: blobs
//! deduplicated by digest, the artifact manifest, and the referrers tag kept up to date.

use super::*;

/// What [`push`] did.
#[derive(Debug)]
pub struct Pushed {
    pub artifact: Digest,
    pub artifact_size: u64,
    /// Layers with an index in the artifact.
    pub indexes: usize,
    /// Their total size.
    pub index_bytes: u64,
    /// The windows blobs' total size (slim indexes: `index::windows`).
    pub windows_bytes: u64,
    /// eStargz layers, which need none (their TOC is their index).
    pub skipped_estargz: usize,
    /// The registry had no referrers API and the `sha256-<hex>` tag was written.
    pub tag_updated: bool,
    /// The access profile pushed with the indexes: its reads, and how many of them name a
    /// layer of this image.
    pub profile: Option<(usize, usize)>,
}

/// Push the cached indexes of every layer of `image` (they must exist: build them first) as
/// an index artifact referring to the image manifest, with `profile` if given. Blobs the
/// repository has are not sent again, so a layer shared by many images has one index blob.
pub async fn push(
    cache: &Cache,
    src: &Source,
    image: &Image,
    profile: Option<&crate::profile::Profile>,
) -> Result<Pushed> {
    let Source::Registry { client, reference } = src else {
        return Err(Error::Unsupported {
            what: "index push target".into(),
            value: format!("{} is not in a registry", src.name()),
        });
    };
    let (registry, repo) = (&reference.registry, &reference.repository);
    let mut indexes = Vec::new();
    let mut skipped_estargz = 0;
    let mut index_bytes = 0;
    let mut windows_bytes = 0;
    for layer in image.unique_layers() {
        let digest = &layer.descriptor.digest;
        if crate::layer::format::toc_format(layer.compression, &layer.descriptor.annotations)
            .is_some()
        {
            skipped_estargz += 1;
            continue;
        }
        let bytes = cache
            .load_index_bytes(digest)
            .ok_or_else(|| Error::NotFound {
                what: "layer index".into(),
                detail: format!("of {digest} in the cache (run `imgfs index build` first)"),
            })?;
        // Slim where there are windows to move (gzip layers): what every mount fetches
        // shrinks to its entries and seek points.
        let full = codec::decode(digest, &bytes)?;
        let (bytes, windows) = match crate::index::windows::slim(&full) {
            Some((slim, windows)) => {
                let pinned = codec::encode_slim(digest, &slim, &Digest::of(&windows));
                (pinned, Some(windows))
            }
            None => (bytes, None),
        };
        index_bytes += bytes.len() as u64;
        let size = bytes.len() as u64;
        let blob = client.push_blob(registry, repo, Bytes::from(bytes)).await?;
        let windows = match windows {
            Some(w) => {
                let size = w.len() as u64;
                windows_bytes += size;
                Some((
                    client.push_blob(registry, repo, Bytes::from(w)).await?,
                    size,
                ))
            }
            None => None,
        };
        indexes.push(IndexBlobs {
            layer: digest.clone(),
            index: (blob, size),
            windows,
        });
    }
    let mut profile_blob = None;
    let mut profile_counts = None;
    if let Some(p) = profile {
        let bytes = p.to_bytes();
        let size = bytes.len() as u64;
        let blob = client.push_blob(registry, repo, Bytes::from(bytes)).await?;
        profile_blob = Some((blob, size));
        let ours: std::collections::HashSet<&Digest> =
            image.layers.iter().map(|l| &l.descriptor.digest).collect();
        let fitting = p
            .reads
            .iter()
            .filter(|(l, _)| p.layers.get(*l as usize).is_some_and(|d| ours.contains(d)))
            .count();
        profile_counts = Some((p.reads.len(), fitting));
    }
    client
        .push_blob(registry, repo, Bytes::from_static(EMPTY_JSON))
        .await?;
    let subject = subject_of(image);
    let manifest = build_manifest_with(&subject, &indexes, profile_blob);
    let artifact_size = manifest.len() as u64;
    let (artifact, subject_seen) = client
        .push_referrer(
            registry,
            repo,
            media::OCI_MANIFEST,
            Bytes::from(manifest),
            &subject.digest,
        )
        .await?;
    let mut tag_updated = false;
    if !subject_seen {
        // OCI distribution 1.1: without the referrers API, the client keeps the list in the
        // `sha256-<hex>` tag (read, add, write back; a concurrent pusher can lose an entry,
        // as with every client that follows this part of the spec).
        let tag = fallback_tag(&subject.digest);
        let existing = match client.get_manifest(registry, repo, &tag).await {
            Ok(m) => Some(m.bytes),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let entry = Referrer {
            media_type: media::OCI_MANIFEST.to_string(),
            digest: artifact.clone(),
            size: artifact_size,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
        };
        if let Some(list) = add_referrer(existing.as_deref(), &entry)? {
            client
                .push_manifest(registry, repo, &tag, media::OCI_INDEX, Bytes::from(list))
                .await?;
            tag_updated = true;
        }
    }
    Ok(Pushed {
        artifact,
        artifact_size,
        indexes: indexes.len(),
        index_bytes,
        windows_bytes,
        skipped_estargz,
        tag_updated,
        profile: profile_counts,
    })
}
