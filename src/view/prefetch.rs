//! Background prefetch (`--prefetch`): what eStargz marks for prefetching, or everything.

use super::{ImageView, Prefetch};

impl ImageView {
    /// Start background fetches, returning at once: with [`Prefetch::Auto`], the files an
    /// eStargz layer marks for prefetching; with [`Prefetch::All`], everything not yet local
    /// (whole blobs with `keep_blobs`, every span or chunk into the chunk store otherwise).
    /// The work stops when the view's reader is dropped.
    pub fn start_prefetch(&self) {
        let r = &self.reader;
        if r.prefetch == Prefetch::None || self.layers.iter().all(|l| l.src.is_local()) {
            return;
        }
        let all = r.prefetch == Prefetch::All;
        let remote: u64 = self
            .layers
            .iter()
            .filter(|l| l.local.get().is_none())
            .map(|l| l.descriptor.size)
            .sum();
        if all && !r.keep_blobs && remote > r.fetcher.chunk_max {
            tracing::warn!(
                "prefetching {remote} bytes into a chunk store bounded at {} bytes: \
                 older spans will be dropped (--keep-blobs keeps whole blobs instead)",
                r.fetcher.chunk_max
            );
        }
        for layer in &self.layers {
            if layer.local.get().is_some() || !(all || layer.toc.is_some()) {
                continue;
            }
            let (fetcher, layer, keep) = (r.fetcher.clone(), layer.clone(), r.keep_blobs);
            let stop = r.background.clone();
            r.fetcher.rt.spawn_blocking(move || {
                let t = std::time::Instant::now();
                let res = if let Some(sg) = &layer.toc {
                    let files: Vec<usize> = if all {
                        (0..sg.chunks.len()).collect()
                    } else {
                        sg.prefetch.clone()
                    };
                    files
                        .iter()
                        .flat_map(|&e| &sg.chunks[e])
                        .take_while(|_| !stop.is_cancelled())
                        .try_for_each(|c| fetcher.toc_chunk_exact(&layer, c).map(|_| ()))
                } else if keep {
                    fetcher.ensure_local(&layer).map(|_| ())
                } else {
                    fetcher.fetch_all_spans(&layer, &stop)
                };
                match res {
                    Ok(()) => {
                        tracing::info!("prefetched layer {} in {:.1?}", layer.digest, t.elapsed())
                    }
                    Err(e) => tracing::warn!("prefetching layer {}: {e}", layer.digest),
                }
            });
        }
    }
}
