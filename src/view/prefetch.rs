//! Background prefetch (`--prefetch`): what eStargz marks for prefetching, or everything.

use super::{ImageView, Prefetch};

impl ImageView {
    /// Start background fetches, returning at once: with [`Prefetch::Auto`], the files an
    /// eStargz layer marks for prefetching; with [`Prefetch::All`], everything not yet local
    /// (whole blobs with `keep_blobs`, every span or chunk into the chunk store otherwise).
    /// The work stops when the view is dropped.
    pub fn start_prefetch(&self) {
        if self.prefetch == Prefetch::None || self.fetcher.src.is_local() {
            return;
        }
        let all = self.prefetch == Prefetch::All;
        let remote: u64 = self
            .layers
            .iter()
            .filter(|l| l.local.get().is_none())
            .map(|l| l.descriptor.size)
            .sum();
        if all && !self.keep_blobs && remote > self.fetcher.chunk_max {
            tracing::warn!(
                "prefetching {remote} bytes into a chunk store bounded at {} bytes: \
                 older spans will be dropped (--keep-blobs keeps whole blobs instead)",
                self.fetcher.chunk_max
            );
        }
        for (li, layer) in self.layers.iter().enumerate() {
            if layer.local.get().is_some() || !(all || layer.stargz.is_some()) {
                continue;
            }
            let (fetcher, layer, keep) = (self.fetcher.clone(), layer.clone(), self.keep_blobs);
            let stop = self.background.clone();
            self.fetcher.rt.spawn_blocking(move || {
                let t = std::time::Instant::now();
                let res = if let Some(sg) = &layer.stargz {
                    let files: Vec<usize> = if all {
                        (0..sg.chunks.len()).collect()
                    } else {
                        sg.prefetch.clone()
                    };
                    files
                        .iter()
                        .flat_map(|&e| &sg.chunks[e])
                        .take_while(|_| !stop.is_cancelled())
                        .try_for_each(|c| fetcher.stargz_chunk(&layer, c).map(|_| ()))
                } else if keep {
                    fetcher.ensure_local(li, &layer).map(|_| ())
                } else {
                    fetcher.fetch_all_spans(li, &layer, &stop)
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
