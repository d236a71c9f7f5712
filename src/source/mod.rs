//! Where images come from: a registry, an OCI layout directory or a `docker save` archive,
//! behind one interface that resolves a reference to an [`Image`] and streams its blobs.
//!
//! A source only produces bytes; it never trusts them. Manifests are verified here, blobs by
//! [`crate::fetch`] as they are stored.

mod archive;
mod layout;

use std::io;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{self, Descriptor, Image, Parsed, Platform};
use crate::reference::{ImageRef, RegistryRef};
use crate::registry::{Client, ClientOptions, RawManifest};

pub use crate::registry::BlobStream;
pub use archive::ArchiveSource;
pub use layout::LayoutSource;

/// Options for opening any source.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    pub registry: ClientOptions,
}

/// A verified image manifest whose config is still to fetch: what work that needs only the
/// manifest (looking for published indexes) starts from, beside the config's fetch.
pub struct ImageManifest<'a> {
    pub digest: &'a Digest,
    pub config: &'a Descriptor,
    pub layers: &'a [Descriptor],
}

/// One image source. An enum rather than a trait object: there are three, all known here.
pub enum Source {
    Registry {
        client: Client,
        reference: RegistryRef,
    },
    Layout(LayoutSource),
    Archive(ArchiveSource),
}

impl Source {
    /// Open the source an [`ImageRef`] names. Local sources are read (and checked) here;
    /// a registry is not contacted until [`Source::resolve`].
    pub async fn open(r: &ImageRef, opts: &SourceOptions) -> Result<Source> {
        Ok(match r {
            ImageRef::Registry(reference) => Source::Registry {
                client: Client::new(opts.registry.clone())?,
                reference: reference.clone(),
            },
            ImageRef::OciLayout { dir, tag } => {
                Source::Layout(LayoutSource::open(dir, tag.clone()).await?)
            }
            ImageRef::DockerArchive { file, reference } => {
                Source::Archive(ArchiveSource::open(file, reference.clone()).await?)
            }
        })
    }

    /// Stop using the registry's mirrors (bytes did not match their digest; a mirror may be
    /// to blame). Returns whether any was in use, i.e. whether asking again may help.
    pub fn distrust_mirrors(&self) -> bool {
        match self {
            Source::Registry { client, reference } => client.distrust_mirrors(&reference.registry),
            _ => false,
        }
    }

    /// Whether blobs come from local files (where a short read is damage, not a network cut).
    pub fn is_local(&self) -> bool {
        !matches!(self, Source::Registry { .. })
    }

    /// A name for messages.
    pub fn name(&self) -> String {
        match self {
            Source::Registry { reference, .. } => reference.to_string(),
            Source::Layout(l) => l.name(),
            Source::Archive(a) => a.name(),
        }
    }

    async fn root_manifest(&self) -> Result<RawManifest> {
        match self {
            Source::Registry { client, reference } => {
                client
                    .get_manifest(
                        &reference.registry,
                        &reference.repository,
                        &reference.manifest_reference(),
                    )
                    .await
            }
            Source::Layout(l) => l.root_manifest().await,
            Source::Archive(_) => unreachable!("archives synthesise their manifest"),
        }
    }

    async fn manifest_by_digest(&self, d: &Descriptor) -> Result<RawManifest> {
        match self {
            Source::Registry { client, reference } => {
                client
                    .get_manifest(
                        &reference.registry,
                        &reference.repository,
                        d.digest.as_str(),
                    )
                    .await
            }
            Source::Layout(l) => l.manifest(d).await,
            Source::Archive(_) => unreachable!("archives synthesise their manifest"),
        }
    }

    /// Resolve to one image: follow an index to the entry for `platform` (the host's when
    /// `None`), verify each manifest, and get the config's bytes from `config`, given the
    /// image manifest (it must verify them: `crate::fetch::resolve` fetches them into the
    /// cache). An explicit
    /// `platform` that a single-platform image does not match is an error.
    pub async fn resolve(
        &self,
        platform: Option<&Platform>,
        config: impl AsyncFnOnce(&ImageManifest<'_>) -> Result<Vec<u8>>,
    ) -> Result<Image> {
        let image = match self {
            Source::Archive(a) => a.image().clone(),
            _ => self.resolve_manifests(platform, config).await?,
        };
        if let Some(p) = platform
            && image.index_digest.is_none()
            && !image.platform.matches(p)
        {
            return Err(Error::NoMatchingPlatform {
                reference: self.name(),
                wanted: p.to_string(),
                available: vec![image.platform.to_string()],
            });
        }
        Ok(image)
    }

    async fn resolve_manifests(
        &self,
        platform: Option<&Platform>,
        config: impl AsyncFnOnce(&ImageManifest<'_>) -> Result<Vec<u8>>,
    ) -> Result<Image> {
        let mut raw = self.root_manifest().await?;
        let mut parsed = manifest::parse(&raw.bytes, raw.content_type.as_deref())?;
        let mut index_digest = None;
        if let Parsed::Index { manifests } = &parsed {
            let wanted = platform.cloned().unwrap_or_else(Platform::host);
            let chosen = manifest::select_platform(&self.name(), manifests, &wanted)?.clone();
            index_digest = Some(raw.digest.clone());
            raw = self.manifest_by_digest(&chosen).await?;
            parsed = manifest::parse(&raw.bytes, Some(&chosen.media_type))?;
            if matches!(parsed, Parsed::Index { .. }) {
                return Err(Error::malformed(
                    "index",
                    format!("{} nests an index inside an index", self.name()),
                ));
            }
        }
        let raw_config = match &parsed {
            Parsed::Image {
                config: desc,
                layers,
                ..
            } => {
                config(&ImageManifest {
                    digest: &raw.digest,
                    config: desc,
                    layers,
                })
                .await?
            }
            _ => Vec::new(),
        };
        manifest::image_from_parts(
            self.name(),
            raw.digest,
            raw.bytes,
            index_digest,
            parsed,
            raw_config,
        )
    }

    /// Bytes `[start, end)` of blob `desc`, unverified (the caller checks them against what
    /// it knows), or `None` when the source ignores ranges and would send the whole blob.
    pub async fn read_range(
        &self,
        desc: &Descriptor,
        start: u64,
        end: u64,
    ) -> Result<Option<Bytes>> {
        use futures_util::StreamExt;
        let mut blob = self.open_range(desc, start, Some(end)).await?;
        if !blob.ranged || blob.start != start {
            return Ok(None);
        }
        let want = (end - start) as usize;
        let mut out = bytes::BytesMut::with_capacity(want);
        while out.len() < want {
            match blob.stream.next().await {
                Some(Ok(chunk)) => {
                    let take = chunk.len().min(want - out.len());
                    out.extend_from_slice(&chunk[..take]);
                }
                Some(Err(e)) => {
                    // A stall is reported as the registry client words it (host, object).
                    return Err(crate::registry::pace::into_stall(e).unwrap_or_else(|e| {
                        Error::Io {
                            context: format!("reading bytes {start}-{end} of {}", desc.digest),
                            cause: e,
                        }
                    }));
                }
                None => break,
            }
        }
        if out.len() < want {
            return Err(Error::Io {
                context: format!("reading bytes {start}-{end} of {}", desc.digest),
                cause: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} sent only {} bytes", self.name(), out.len()),
                ),
            });
        }
        Ok(Some(out.freeze()))
    }

    /// Bytes `[start, end)` of blob `desc` as they arrive, unverified, or `None` when the
    /// source ignores ranges. The stream may end early or carry more; the caller counts.
    pub async fn range_stream(
        &self,
        desc: &Descriptor,
        start: u64,
        end: u64,
    ) -> Result<Option<Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>>> {
        let blob = self.open_range(desc, start, Some(end)).await?;
        Ok((blob.ranged && blob.start == start).then_some(blob.stream))
    }

    /// Stream blob `desc` from byte `offset` on.
    pub async fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<BlobStream> {
        self.open_range(desc, offset, None).await
    }

    /// Stream blob `desc` from byte `offset` to `end` (or its end).
    async fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        end: Option<u64>,
    ) -> Result<BlobStream> {
        match self {
            Source::Registry { client, reference } => {
                if !desc.urls.is_empty() {
                    tracing::debug!(
                        "{} is a foreign layer; fetching it from the registry",
                        desc.digest
                    );
                }
                client
                    .get_blob(
                        &reference.registry,
                        &reference.repository,
                        &desc.digest,
                        offset,
                        end,
                    )
                    .await
            }
            // Local files stop where asked by the reader taking only what it wants.
            Source::Layout(l) => l.open_blob(&desc.digest, offset).await,
            Source::Archive(a) => a.open_blob(&desc.digest, offset).await,
        }
    }
}

/// Stream `len` bytes of a local file from `start`: the blob reader of both local sources.
async fn file_range_stream(path: &std::path::Path, start: u64, len: u64) -> io::Result<BlobStream> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(io::SeekFrom::Start(start)).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), 256 << 10);
    Ok(BlobStream {
        start: 0,
        ranged: true,
        content_type: None,
        stream: Box::pin(stream),
    })
}

/// Where a local source keeps digest `d` cannot be found.
fn missing_blob(where_: &str, d: &Digest) -> Error {
    Error::NotFound {
        what: "blob".into(),
        detail: format!("{d} in {where_}"),
    }
}
