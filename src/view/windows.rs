//! The windows of a layer whose index came without them (a published slim index,
//! `index::windows`): each fetched by range from the windows blob beside the span that needs
//! it — a task started before the span's fetch, so both cost one round trip —, checked
//! against its digest and kept in the chunk store like a span. Batches (readahead, profiles,
//! prefetch) bring their spans' windows in one more request alongside.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::LayerData;
use super::fetcher::{Fetcher, RANGE_ATTEMPTS};
use crate::digest::SpanDigest;
use crate::index::windows::WindowsApart;
use crate::manifest::Descriptor;
use crate::source::Source;

/// Windows fetched, each with its digest.
type Fetched = std::io::Result<Vec<(SpanDigest, Bytes)>>;

/// A window being got: already stored, or on its way (the one with this digest).
pub(super) enum PendingWindow {
    Stored(Bytes),
    Fetching(SpanDigest, tokio::task::JoinHandle<Fetched>),
}

impl Fetcher {
    /// When `layer`'s index came without windows and span `k`'s checkpoint has one: start
    /// getting it (the chunk store, else a range request on the runtime). `None`: the
    /// checkpoint's own window is the one.
    pub(super) fn start_window(&self, layer: &LayerData, k: usize) -> Option<PendingWindow> {
        let apart = layer.seek().ok()?.windows_apart.clone()?;
        let (slot, digest) = (*apart.slots.get(k)?)?;
        if let Some(b) = self.cache.load_chunk(&digest) {
            return Some(PendingWindow::Stored(b));
        }
        let src = layer.src.clone();
        let task = self.rt.spawn(fetch_slots(src, apart, vec![(slot, digest)]));
        Some(PendingWindow::Fetching(digest, task))
    }

    /// The window `pending` brings, kept in the chunk store.
    pub(super) fn finish_window(
        &self,
        layer: &LayerData,
        pending: PendingWindow,
    ) -> std::io::Result<Bytes> {
        match pending {
            PendingWindow::Stored(b) => Ok(b),
            PendingWindow::Fetching(wanted, task) => {
                let got = self.rt.block_on(task).map_err(std::io::Error::other)??;
                self.count_range(got.iter().map(|(_, b)| b.len() as u64).sum());
                let mut window = None;
                for (digest, bytes) in got {
                    self.keep_window(layer, &digest, &bytes);
                    if digest == wanted {
                        window = Some(bytes);
                    }
                }
                Ok(window.expect("every slot asked for came, checked"))
            }
        }
    }

    /// The nearest checkpoint at or before `k` of `layer` (an index without windows) whose
    /// window is at hand — stored, or none needed (a member's start; the first checkpoint
    /// always is one) —, and that window.
    pub(super) fn known_window_before(&self, layer: &LayerData, k: usize) -> (usize, Bytes) {
        let apart = layer.seek().ok().and_then(|sp| sp.windows_apart.clone());
        for j in (0..=k).rev() {
            match apart.as_ref().and_then(|a| *a.slots.get(j)?) {
                None => return (j, Bytes::new()),
                Some((_, digest)) => {
                    if let Some(w) = self.cache.load_chunk(&digest) {
                        return (j, w);
                    }
                }
            }
        }
        (0, Bytes::new())
    }

    /// Keep a fetched window (one the store has already is not written again: a whole
    /// windows blob brings them all).
    fn keep_window(&self, layer: &LayerData, digest: &SpanDigest, bytes: &[u8]) {
        if !self.cache.has_chunk(digest) {
            self.keep_chunk(layer, digest, bytes);
        }
    }

    /// Start fetching, in one request, the windows that spans `ks` of `layer` need and the
    /// chunk store lacks (for a batch of spans: the reads that follow find both local).
    pub(super) fn start_windows(
        &self,
        layer: &LayerData,
        ks: Range<usize>,
    ) -> Option<PendingWindow> {
        let apart = layer.seek().ok()?.windows_apart.clone()?;
        let missing: Vec<(u32, SpanDigest)> = ks
            .filter_map(|k| *apart.slots.get(k)?)
            .filter(|(_, d)| !self.cache.has_chunk(d))
            .collect();
        if missing.is_empty() {
            return None;
        }
        let src = layer.src.clone();
        let first = missing[0].1;
        Some(PendingWindow::Fetching(
            first,
            self.rt.spawn(fetch_slots(src, apart, missing)),
        ))
    }

    /// Keep what [`Fetcher::start_windows`] brought; a failure only costs the reads that
    /// need those windows a request each.
    pub(super) fn finish_windows(&self, layer: &LayerData, pending: PendingWindow) {
        if let Err(e) = self.finish_window(layer, pending) {
            tracing::debug!("windows of layer {}: {e}", layer.digest);
        }
    }
}

/// The windows in `slots` (ascending, so one range covers them) fetched from the windows
/// blob and each checked against its digest: a range request, or the whole blob from a
/// source that ignores ranges — then every window in it that checks out comes back too, so
/// that the next reads do not download it again. Tried again as spans are when the bytes
/// were wrong.
async fn fetch_slots(
    src: Arc<Source>,
    apart: Arc<WindowsApart>,
    slots: Vec<(u32, SpanDigest)>,
) -> std::io::Result<Vec<(SpanDigest, Bytes)>> {
    let desc = crate::artifact::windows_descriptor(&apart.blob, apart.blob_size);
    let first = slots.first().expect("at least one slot").0;
    let last = slots.last().expect("at least one slot").0;
    let (a, _) = WindowsApart::slot_range(first);
    let (_, b) = WindowsApart::slot_range(last);
    let what = || format!("windows {first}-{last} of {}", apart.blob);
    let mut last_err = None;
    for _ in 0..RANGE_ATTEMPTS {
        let (bytes, base) = match src.read_range(&desc, a, b).await {
            Ok(Some(bytes)) => (bytes, a),
            Ok(None) => match whole(&src, &desc).await {
                Ok(bytes) => (bytes, 0),
                Err(e) => return Err(std::io::Error::other(format!("{}: {e}", what()))),
            },
            Err(e) => {
                last_err = Some(std::io::Error::other(format!("{}: {e}", what())));
                continue;
            }
        };
        let mut out = Vec::with_capacity(slots.len());
        for &(slot, digest) in &slots {
            let (sa, sb) = WindowsApart::slot_range(slot);
            let at = (sa - base) as usize..(sb - base) as usize;
            if bytes.get(at.clone()).map(SpanDigest::of) != Some(digest) {
                break;
            }
            out.push((digest, bytes.slice(at)));
        }
        if out.len() == slots.len() {
            if base == 0 && bytes.len() as u64 == apart.blob_size {
                let more = apart
                    .slots
                    .iter()
                    .flatten()
                    .filter(|(s, _)| !slots.iter().any(|w| w.0 == *s));
                for &(slot, digest) in more {
                    let (sa, sb) = WindowsApart::slot_range(slot);
                    let window = bytes.slice(sa as usize..sb as usize);
                    if SpanDigest::of(&window) == digest {
                        out.push((digest, window));
                    }
                }
            }
            return Ok(out);
        }
        tracing::warn!(
            "{} from {}: bytes that do not match the index; not using them",
            what(),
            src.name()
        );
        src.distrust_mirrors();
        last_err = Some(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: the source sent bytes that do not match the index",
                what()
            ),
        ));
    }
    Err(last_err.expect("at least one attempt"))
}

/// A whole windows blob (a few MiB at most: 32 KiB per span), for a source that ignores
/// ranges; its windows are checked one by one by the caller.
async fn whole(src: &Source, desc: &Descriptor) -> crate::error::Result<Bytes> {
    let mut blob = src.open_blob(desc, 0).await?;
    let mut out = bytes::BytesMut::with_capacity(desc.size as usize);
    while let Some(chunk) = blob.stream.next().await {
        let chunk = chunk.map_err(|e| crate::error::Error::Io {
            context: format!("reading {}", desc.digest),
            cause: e,
        })?;
        if out.len() + chunk.len() > desc.size as usize {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}
