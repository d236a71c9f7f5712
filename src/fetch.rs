//! Verified downloads: the layer between `source` (which only produces bytes) and `cache`
//! (which only stores them). A blob is streamed from its source, resumed with `Range` where a
//! connection is cut, retried from the registry itself when a mirror sent wrong bytes, hashed
//! as it arrives, optionally fed to a consumer (an extractor or an indexer) while it downloads,
//! and named in the cache only once its digest and size match its descriptor.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};

use crate::cache::Cache;
use crate::digest::Hasher;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Descriptor, Image, Platform};
use crate::source::{ImageManifest, Source};

/// How many times one blob download may be cut and resumed before giving up.
const MAX_RESUMES: u32 = 5;

/// The most a blob of unknown size (schema 1 layers) may be.
const MAX_UNKNOWN_SIZE: u64 = 16 << 30;

/// Resolve `src` to one image (see [`Source::resolve`]), its config fetched and verified
/// into `cache`.
pub async fn resolve(cache: &Cache, src: &Source, platform: Option<&Platform>) -> Result<Image> {
    resolve_alongside(cache, src, platform, async |_| ()).await
}

/// [`resolve`], running `alongside` with the image manifest while its config is fetched
/// (one round trip less for work that needs only the manifest). `alongside` is not run for
/// images without a config to fetch (schema 1, `docker save` archives).
pub async fn resolve_alongside(
    cache: &Cache,
    src: &Source,
    platform: Option<&Platform>,
    alongside: impl AsyncFnOnce(&ImageManifest<'_>),
) -> Result<Image> {
    src.resolve(platform, async |m: &ImageManifest<'_>| {
        let config = async {
            let path = blob(cache, src, m.config).await?;
            tokio::fs::read(&path).await.map_err(|e| Error::Io {
                context: format!("reading cached config {}", path.display()),
                cause: e,
            })
        };
        // A config that fails ends the wait: the lookup beside it is dropped.
        let (config, ()) = tokio::try_join!(config, async {
            alongside(m).await;
            Ok(())
        })?;
        Ok(config)
    })
    .await
}

/// Make sure blob `desc` is in the cache, downloading and verifying it if not. A cut
/// download resumes where it stopped (`Range`); nothing unverified is ever stored.
pub async fn blob(cache: &Cache, src: &Source, desc: &Descriptor) -> Result<PathBuf> {
    blob_into(cache, src, desc, &|_| {}, None).await
}

/// [`blob`], calling `progress` with the bytes stored so far, and sending every
/// byte, once and in order, to `sink` as it arrives — so a consumer can work while the
/// download runs. The sink sees bytes *before* the whole blob is verified: whoever reads
/// it must discard its work unless this returns `Ok`. A closed sink is ignored.
pub async fn blob_into(
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    progress: &(dyn Fn(u64) + Sync),
    sink: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
) -> Result<PathBuf> {
    let path = stream_blob(cache, src, desc, progress, sink, Keep::Named).await?;
    Ok(path.expect("kept blobs have a path"))
}

/// What a download keeps of a blob once it verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: its consumer had the bytes.
    No,
    /// The blob, stored under its name in the cache.
    Named,
    /// The verified bytes in a file of the cache's `tmp/`, never named: the caller reads it
    /// and removes it (what `cache prune` does with one left by a killed process).
    Verified,
}

/// Download blob `desc` through `sink` and verify it, keeping what `keep` says (a blob
/// already cached is read from the cache). Returns the path of what was kept, if anything:
/// the cached blob's, or with [`Keep::Verified`] a temporary file's.
/// Without a sink, wrong bytes stop the use of the registry's mirrors and the blob is
/// fetched again from the registry itself. A caller with a sink has consumed the bytes:
/// it decides (`Source::distrust_mirrors`) and starts over itself.
pub async fn stream_blob(
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    progress: &(dyn Fn(u64) + Sync),
    sink: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
    keep: Keep,
) -> Result<Option<PathBuf>> {
    match stream_blob_once(cache, src, desc, progress, sink, keep).await {
        Err(e @ Error::DigestMismatch { .. }) => {
            if sink.is_none() && src.distrust_mirrors() {
                tracing::warn!("{e}; fetching it again from the registry");
                return stream_blob_once(cache, src, desc, progress, None, keep).await;
            }
            Err(e)
        }
        other => other,
    }
}

/// One try at downloading blob `desc` (see [`stream_blob`]): responses are taken one after
/// another, each resuming where the one before was cut, until the blob is whole.
async fn stream_blob_once(
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    progress: &(dyn Fn(u64) + Sync),
    sink: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
    keep: Keep,
) -> Result<Option<PathBuf>> {
    let dest = cache.blob_path(&desc.digest);
    if dest.is_file() {
        tracing::debug!("{} already cached", desc.digest);
        if let Some(s) = sink {
            // Stored meanwhile by another process: the consumer still needs the bytes.
            feed_from_file(&dest, s).await?;
        }
        return Ok(Some(dest));
    }
    let mut got = Received::new(cache, src, desc, keep)?;
    let mut cuts = 0;
    loop {
        let mut blob = match src.open_blob(desc, got.written).await {
            // A resume the registry cannot serve: its blob ends where we are.
            Err(Error::BlobEndsBefore { .. }) if !desc.size_unknown => {
                return Err(got.short(None));
            }
            other => other?,
        };
        let before = got.written;
        let cut = got.take_response(&mut blob, progress, sink).await?;
        let Some(reason) = got.resume_reason(cut, before, cuts, blob.content_type.as_deref())?
        else {
            break;
        };
        cuts += 1;
        got.wait_to_resume(&reason, cuts).await?;
    }
    got.finish(cache)
}

/// What one download of a blob has received so far, across the responses it took: hashed,
/// counted against the descriptor's size, and written to the cache's temporary file when kept.
struct Received<'a> {
    src: &'a Source,
    desc: &'a Descriptor,
    /// Where the bytes go while unverified; `None` when the blob is not kept.
    tmp: Option<tempfile::NamedTempFile>,
    keep: Keep,
    hasher: Hasher,
    written: u64,
    /// The most bytes the blob may have: its size, or a bound when the size is unknown.
    limit: u64,
}

impl<'a> Received<'a> {
    /// Nothing received yet; a temporary file in the cache to receive into when `keep`.
    fn new(cache: &Cache, src: &'a Source, desc: &'a Descriptor, keep: Keep) -> Result<Self> {
        let tmp = if keep == Keep::No {
            None
        } else {
            Some(cache.new_blob_file()?)
        };
        let limit = if desc.size_unknown {
            MAX_UNKNOWN_SIZE
        } else {
            desc.size
        };
        Ok(Received {
            src,
            desc,
            tmp,
            keep,
            hasher: Hasher::new(),
            written: 0,
            limit,
        })
    }

    /// What the download is, for error messages.
    fn what(&self) -> String {
        describe(self.src, self.desc)
    }

    /// Take the bytes of one response until it ends or is cut. Returns why it was cut, if it
    /// was; an error only for what no resume can mend.
    async fn take_response(
        &mut self,
        blob: &mut crate::registry::BlobStream,
        progress: &(dyn Fn(u64) + Sync),
        sink: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
    ) -> Result<Option<String>> {
        // A server that ignored Range sends bytes we have: skip them (what we kept was
        // hashed already, and the final digest covers exactly what we keep).
        let mut skip = self.written.saturating_sub(blob.start);
        if skip > 0 {
            tracing::debug!("{}: range ignored; skipping {skip} bytes", self.desc.digest);
        }
        while let Some(chunk) = blob.stream.next().await {
            let mut chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // A stall that got the registry refused is final; one before that
                    // is resumed like a cut.
                    if crate::registry::pace::stall_refused(&e) == Some(true) {
                        return Err(crate::registry::pace::into_stall(e)
                            .expect("a stall carries its error"));
                    }
                    return Ok(Some(e.to_string()));
                }
            };
            if skip > 0 {
                let n = skip.min(chunk.len() as u64);
                skip -= n;
                chunk = chunk.slice(n as usize..);
                if chunk.is_empty() {
                    continue;
                }
            }
            self.take(chunk, progress, sink).await?;
        }
        Ok(None)
    }

    /// Count, hash, keep and pass on one chunk of new bytes.
    async fn take(
        &mut self,
        chunk: bytes::Bytes,
        progress: &(dyn Fn(u64) + Sync),
        sink: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
    ) -> Result<()> {
        self.written += chunk.len() as u64;
        if self.written > self.limit {
            return Err(Error::SizeMismatch {
                what: "blob".into(),
                digest: self.desc.digest.clone(),
                expected: self.limit,
                actual: self.written,
            });
        }
        self.hasher.update(&chunk);
        // Plain blocking writes: they land in the page cache, and routing every chunk
        // through tokio's blocking pool costs more than it saves.
        let (src, desc) = (self.src, self.desc);
        if let Some(tmp) = &mut self.tmp {
            tmp.write_all(&chunk).ctx(|| describe(src, desc))?;
        }
        progress(self.written);
        if let Some(s) = sink {
            // A closed sink means its reader gave up; keep downloading for the cache.
            let _ = s.send(chunk).await;
        }
        Ok(())
    }

    /// After a response that began at byte `before` and was `cut` (or not), why the
    /// download must resume, or `None` when it has all there is to verify. `cuts` is how
    /// many responses were cut before this one.
    fn resume_reason(
        &self,
        cut: Option<String>,
        before: u64,
        cuts: u32,
        content_type: Option<&str>,
    ) -> Result<Option<String>> {
        let desc = self.desc;
        if !desc.size_unknown && self.written == desc.size {
            // Everything arrived, even if the connection then broke: verify it.
            return Ok(None);
        }
        if cut.is_none() && !desc.size_unknown && self.written < desc.size {
            // A response that ended whole and brought nothing new, after a first one
            // that ended early too: the registry has no more to send. (One short whole
            // response alone may be a lying `Content-Length`: it is resumed.)
            if self.written == before && cuts > 0 {
                return Err(self.short(content_type));
            }
            return Ok(Some(format!(
                "stream ended at byte {} of {}",
                self.written, desc.size
            )));
        }
        Ok(cut)
    }

    /// Fail if the download may not resume after this, its `cuts`-th cut (a local file does
    /// not heal; the resumes are bounded), else wait the backoff before resuming.
    async fn wait_to_resume(&self, reason: &str, cuts: u32) -> Result<()> {
        if self.src.is_local() {
            return Err(Error::malformed(
                self.what(),
                format!("{reason} (the local file is damaged or truncated)"),
            ));
        }
        if cuts > MAX_RESUMES {
            return Err(Error::Unreachable {
                host: self.src.name(),
                detail: format!(
                    "{}: gave up after {MAX_RESUMES} interrupted downloads ({reason})",
                    self.what()
                ),
            });
        }
        tracing::info!(
            "{}: {reason}; resuming at byte {}",
            self.desc.digest,
            self.written
        );
        tokio::time::sleep(crate::registry::backoff(cuts)).await;
        Ok(())
    }

    /// The error for a registry that has no more bytes to send (see [`short_blob`]).
    fn short(&self, content_type: Option<&str>) -> Error {
        short_blob(
            self.src,
            self.desc,
            &self.hasher,
            self.written,
            content_type,
        )
    }

    /// Verify the whole download against its digest, and store it in the cache when kept.
    fn finish(self, cache: &Cache) -> Result<Option<PathBuf>> {
        let actual = self.hasher.finish();
        if actual != self.desc.digest {
            return Err(Error::DigestMismatch {
                what: format!("blob from {}", self.src.name()),
                expected: self.desc.digest.clone(),
                actual,
            });
        }
        let Some(tmp) = self.tmp else { return Ok(None) };
        if self.keep == Keep::Verified {
            let (_, path) = tmp.keep().map_err(|e| Error::Io {
                context: format!("keeping the verified download of {}", self.desc.digest),
                cause: e.error,
            })?;
            return Ok(Some(path));
        }
        cache.store_blob(tmp, &self.desc.digest).map(Some)
    }
}

/// Stream blob `desc` into a blocking consumer while it downloads — index it, or extract it —
/// and verify it; keep it in the cache only when `keep`. `attempt` makes the consumer of one
/// try: the consumer's work counts only if this returns `Ok`. Wrong bytes, where a mirror may
/// have sent them, make one more try from the registry itself; `again` runs before it (to
/// throw away what the first consumer made). A failed download explains a failed
/// consumer, not the reverse: its error wins. Returns the consumer's result and the cached
/// path, if kept.
pub async fn consume<T, C>(
    cache: &Cache,
    src: &Source,
    desc: &Descriptor,
    keep: Keep,
    progress: &(dyn Fn(u64) + Sync),
    mut attempt: impl FnMut() -> C,
    mut again: impl AsyncFnMut() -> Result<()>,
) -> Result<(T, Option<PathBuf>)>
where
    C: FnOnce(crate::layer::ChannelReader) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    loop {
        // A few chunks of slack: enough to keep both sides busy, little memory per blob.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let consumer = attempt();
        let consuming =
            tokio::task::spawn_blocking(move || consumer(crate::layer::ChannelReader::new(rx)));
        let fetched = stream_blob(cache, src, desc, progress, Some(&tx), keep).await;
        drop(tx);
        let consumed = consuming.await.map_err(Error::worker)?;
        match fetched {
            Err(Error::DigestMismatch { .. }) if src.distrust_mirrors() => {
                tracing::warn!("{}: wrong bytes; once more, from the registry", desc.digest);
                again().await?;
            }
            fetched => {
                let path = fetched?;
                return match consumed {
                    Ok(t) => Ok((t, path)),
                    Err(e) => {
                        // A verified copy nobody will read.
                        if keep == Keep::Verified
                            && let Some(p) = path.filter(|p| *p != cache.blob_path(&desc.digest))
                        {
                            let _ = std::fs::remove_file(p);
                        }
                        Err(e)
                    }
                };
            }
        }
    }
}

/// Fetch every blob of `descs` with at most `jobs` downloads in flight. A digest listed
/// twice is fetched once. Returns the paths in the order of `descs`.
pub async fn all(
    cache: &Cache,
    src: &Source,
    descs: &[&Descriptor],
    jobs: usize,
) -> Result<Vec<PathBuf>> {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&Descriptor> = descs
        .iter()
        .copied()
        .filter(|d| seen.insert(d.digest.clone()))
        .collect();
    futures_util::stream::iter(unique)
        .map(|d| blob(cache, src, d))
        .buffer_unordered(jobs.max(1))
        .try_collect::<Vec<_>>()
        .await?;
    Ok(descs.iter().map(|d| cache.blob_path(&d.digest)).collect())
}

/// Blob `desc` from `src`, as error messages name a download.
fn describe(src: &Source, desc: &Descriptor) -> String {
    format!("blob {} from {}", desc.digest, src.name())
}

/// Send a cached blob's bytes to a download consumer.
async fn feed_from_file(path: &Path, sink: &tokio::sync::mpsc::Sender<bytes::Bytes>) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path)
        .await
        .ctx(|| format!("opening {}", path.display()))?;
    loop {
        let mut buf = bytes::BytesMut::with_capacity(256 << 10);
        let n = f
            .read_buf(&mut buf)
            .await
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 || sink.send(buf.freeze()).await.is_err() {
            return Ok(());
        }
    }
}

/// The error for blob `desc` when the registry has no bytes past `received` though the
/// descriptor claims more: either the bytes are the blob and the descriptor's size is wrong,
/// or they are something else (an HTML error page with status 200, say), named by its type.
fn short_blob(
    src: &Source,
    desc: &Descriptor,
    hasher: &Hasher,
    received: u64,
    content_type: Option<&str>,
) -> Error {
    let actual = hasher.clone().finish();
    let what = format!("blob from {}", src.name());
    if actual == desc.digest {
        return Error::BlobShorter {
            what,
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: received,
        };
    }
    Error::NotTheBlob {
        what,
        expected: desc.digest.clone(),
        actual,
        received,
        size: desc.size,
        content_type: content_type.map_or("no stated type".into(), |t| format!("content-type {t}")),
    }
}
