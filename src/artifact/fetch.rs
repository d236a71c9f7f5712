//! Finding a published artifact for an image (referrers API, else the fallback tag) and
//! fetching, checking and caching the indexes (and access profile) a view needs.

use super::*;

/// Refuse an index that cannot describe `layer`: one whose seek points lie past the blob's
/// end (a forged index could otherwise send range reads anywhere), or a gzip/zstd layer's
/// index without seek points.
fn check_fits(index: &LayerIndex, layer: &Layer) -> std::result::Result<(), String> {
    let size = layer.descriptor.size;
    let seek = index
        .seek
        .as_ref()
        .ok_or_else(|| "it has no seek points".to_string())?;
    if let Some(c) = seek.checkpoints.iter().find(|c| c.in_offset > size) {
        return Err(format!(
            "a seek point at byte {} of a {size}-byte layer",
            c.in_offset
        ));
    }
    if layer.compression == Compression::None
        && let Some(e) = index
            .entries
            .iter()
            .find(|e| e.offset.saturating_add(e.size) > size)
    {
        return Err(format!("{} ends past the layer's end", e.path));
    }
    Ok(())
}

/// Look for an index artifact of image `subject` (its manifest's digest) and store, for each of `wanted`, the index it
/// offers, checked; with `want_profile`, the access profile of the newest artifact that has
/// one too. Returns the indexes stored, decoded (a view opening now need not decode them
/// again). Never fails: anything wrong is logged
/// (naming the artifact and what was wrong) and the layer is indexed locally instead.
pub async fn fetch_indexes(
    cache: &Cache,
    src: &Source,
    subject: &Digest,
    wanted: &[&Layer],
    want_profile: bool,
) -> Vec<(Digest, LayerIndex)> {
    let Source::Registry { client, reference } = src else {
        return Vec::new();
    };
    let at = Repo {
        client,
        registry: &reference.registry,
        repo: &reference.repository,
    };
    let t = std::time::Instant::now();
    let candidates = find_artifacts(&at, subject).await;
    if candidates.is_empty() {
        tracing::debug!("no index artifact for {subject} ({:.1?})", t.elapsed());
        return Vec::new();
    }
    let mut missing: Vec<&Layer> = wanted.to_vec();
    let mut stored = Vec::new();
    // The newest profile among the artifacts looked at goes with the indexes.
    let mut profile_done = !want_profile;
    // The newest artifact alone usually offers everything; when it does not, the older
    // ones' manifests are asked for a few at once rather than one round trip each.
    let manifest = |artifact: Digest| {
        let at = &at;
        async move {
            let m = at
                .client
                .get_manifest(at.registry, at.repo, artifact.as_str())
                .await;
            (artifact, m)
        }
    };
    let mut rest = candidates.into_iter();
    let newest = rest.next().map(manifest);
    let mut manifests = futures_util::stream::iter(newest)
        .then(|f| f)
        .chain(
            futures_util::stream::iter(rest)
                .map(manifest)
                .buffered(JOBS),
        )
        .boxed();
    while !(missing.is_empty() && profile_done) {
        let Some((artifact, m)) = manifests.next().await else {
            break;
        };
        let (indexes, had_profile) =
            store_offered(cache, &at, subject, &artifact, m, &missing, !profile_done).await;
        for (digest, index) in indexes {
            missing.retain(|l| l.descriptor.digest != digest);
            stored.push((digest, index));
        }
        profile_done |= had_profile;
    }
    tracing::info!(
        "{} layer index(es) of {subject} from the registry in {:.1?}",
        stored.len(),
        t.elapsed()
    );
    stored
}

/// The repository an image's index artifacts are looked for in.
struct Repo<'a> {
    client: &'a crate::registry::Client,
    registry: &'a str,
    repo: &'a str,
}

/// The index artifacts of `subject`, as the referrers API lists them or, on a registry
/// without one, the fallback tag names. A failure is logged and finds none: the layers are
/// then indexed here.
async fn find_artifacts(at: &Repo<'_>, subject: &Digest) -> Vec<Digest> {
    let Repo {
        client,
        registry,
        repo,
    } = *at;
    // Both at once: a registry without the referrers API (distribution 2.x) answers the
    // tag, and asking for it only after the API's 404 costs a round trip on every cold open.
    let tag = fallback_tag(subject);
    let (api, by_tag) = tokio::join!(
        client.get_referrers(registry, repo, subject, ARTIFACT_TYPE),
        client.get_manifest(registry, repo, &tag),
    );
    let list = match api {
        Ok(Some(list)) => Some(list),
        Ok(None) => match by_tag {
            Ok(m) => Some(m.bytes),
            Err(Error::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!("looking for an index artifact of {subject}: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("looking for an index artifact of {subject}: {e}");
            None
        }
    };
    match list.as_deref().map(candidates) {
        None => Vec::new(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::warn!("referrers of {subject}: {e}");
            Vec::new()
        }
    }
}

/// Fetch the access profile blob `blob` and keep it for image `subject`, if it parses.
async fn store_profile(
    cache: &Cache,
    at: &Repo<'_>,
    subject: &Digest,
    blob: &Descriptor,
) -> Result<()> {
    let bytes = at
        .client
        .get_blob_bytes(
            at.registry,
            at.repo,
            &blob.digest,
            crate::profile::MAX_BYTES,
        )
        .await?;
    crate::profile::Profile::parse(&bytes)?;
    cache.store_published_profile(subject, &bytes)
}

/// Store the indexes that `artifact` (its manifest as the registry answered) offers for
/// layers of `missing`, checked, a few at once, and with `want_profile` its access profile,
/// alongside them (a round trip less than after them). Returns the layers whose index was
/// stored, with it decoded (each refusal is logged), and whether the artifact offered a
/// profile.
async fn store_offered(
    cache: &Cache,
    at: &Repo<'_>,
    subject: &Digest,
    artifact: &Digest,
    manifest: Result<crate::registry::RawManifest>,
    missing: &[&Layer],
    want_profile: bool,
) -> (Vec<(Digest, LayerIndex)>, bool) {
    let Repo {
        client,
        registry,
        repo,
    } = *at;
    let offered = match manifest {
        Ok(m) => parse_manifest(&m.bytes, subject).map(|o| (o, offered_profile(&m.bytes))),
        Err(e) => Err(e),
    };
    let (offered, profile) = match offered {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("index artifact {artifact} of {subject} not used: {e}");
            return (Vec::new(), false);
        }
    };
    // Collected, not chained: a stream holding closures over borrowed layers makes this
    // future too particular about lifetimes to be spawned (the layer store spawns it).
    let jobs: Vec<(Layer, Offered)> = missing
        .iter()
        .filter_map(|l| {
            let blob = offered.get(&l.descriptor.digest)?;
            Some(((*l).clone(), blob.clone()))
        })
        .collect();
    let had_profile = profile.is_some();
    let profile = async {
        let Some(p) = profile.filter(|_| want_profile) else {
            return;
        };
        if let Err(e) = store_profile(cache, at, subject, &p).await {
            tracing::warn!(
                "access profile {} of artifact {artifact} not used: {e}",
                p.digest
            );
        }
    };
    let indexes = futures_util::stream::iter(jobs)
        .map(|(layer, blob)| async move {
            let digest = layer.descriptor.digest.clone();
            match fetch_one(cache, client, registry, repo, &layer, &blob).await {
                Ok(index) => Some((digest, index)),
                Err(e) => {
                    tracing::warn!(
                        "index of layer {digest} from artifact {artifact} refused \
                             ({e}); indexing the layer here instead"
                    );
                    None
                }
            }
        })
        .buffer_unordered(JOBS)
        .filter_map(std::future::ready)
        .collect::<Vec<(Digest, LayerIndex)>>();
    let (stored, ()) = futures_util::join!(indexes, profile);
    (stored, had_profile)
}

/// Fetch, check and cache the index `offered` for `layer`: a full one, or a slim one made
/// usable with its windows blob (which is not fetched: reads take its windows by range).
async fn fetch_one(
    cache: &Cache,
    client: &crate::registry::Client,
    registry: &str,
    repo: &str,
    layer: &Layer,
    offered: &Offered,
) -> Result<LayerIndex> {
    let bytes = client
        .get_blob_bytes(registry, repo, &offered.index.digest, MAX_INDEX_BYTES)
        .await?;
    let digest = layer.descriptor.digest.clone();
    let layer = layer.clone();
    let cache = cache.clone();
    let windows = offered.windows.as_ref().map(|w| (w.digest.clone(), w.size));
    // Decoding a big index takes milliseconds of CPU: off the async threads.
    tokio::task::spawn_blocking(move || {
        let index = match &windows {
            None => codec::decode(&digest, &bytes)?,
            Some((blob, size)) => crate::index::windows::take_apart(
                codec::decode_slim(&digest, &bytes)?,
                blob.clone(),
                *size,
            )?,
        };
        check_fits(&index, &layer).map_err(|r| Error::malformed("layer index", r))?;
        match &windows {
            None => cache.store_published_index(&digest, &bytes)?,
            Some((blob, size)) => cache.store_published_slim(&digest, &bytes, blob, *size)?,
        }
        Ok(index)
    })
    .await
    .map_err(|e| Error::Io {
        context: "a decoding thread failed".into(),
        cause: std::io::Error::other(e.to_string()),
    })?
}
