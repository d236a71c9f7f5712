//! Replaying an access profile (`crate::profile`) when a view opens: the spans and chunks a
//! workload read before are fetched into the chunk store in the background, several
//! requests at once, in profile order, so that the workload's reads find them local.
//! Adjacent spans of a layer go in one ranged request (`Fetcher::fetch_batch`). Reads that
//! want a span or chunk being fetched here wait for it at its gate instead of fetching it
//! again. Best effort throughout: what fails here is fetched by the read that needs it.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::fetcher::{Fetcher, MAX_RANGE};
use super::readahead::READAHEAD_MAX;
use super::{ImageView, LayerData};
use crate::layer::format::Chunk;
use crate::profile::Profile;

/// Requests a profile keeps in flight: enough to fill a long fat link with the small
/// requests a program start makes, few enough not to crowd out the reads it makes itself.
pub const PROFILE_JOBS: usize = 6;

/// One request of a profile's replay.
enum Job {
    /// Consecutive spans of a seekable layer, in one range request.
    Spans(Arc<LayerData>, Range<usize>),
    /// One chunk of a TOC layer.
    Chunk(Arc<LayerData>, Chunk),
}

/// What a profile's plan holds, for the log and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProfilePlan {
    /// Requests planned (a run of adjacent spans is one).
    pub requests: usize,
    /// Spans and chunks they cover.
    pub pieces: usize,
    /// Reads passed over: a layer not in this image, an offset outside its blob or at no
    /// chunk.
    pub ignored: usize,
    /// Reads of layers whose bytes are local (a cached blob, a local source): nothing to
    /// fetch.
    pub local: usize,
}

impl ImageView {
    /// Fetch what `profile` names into the chunk store in the background, returning at
    /// once. Stops when the view's reader is dropped. A profile that does not fit the image
    /// costs the bytes it names at most: every span and chunk is verified as reads verify
    /// them.
    pub fn start_profile(&self, profile: Profile) {
        let r = &self.reader;
        let (fetcher, stop) = (r.fetcher.clone(), r.background.clone());
        let layers = self.layers.clone();
        r.fetcher.rt.spawn_blocking(move || {
            let t = std::time::Instant::now();
            let (jobs, plan) = plan(&profile, &layers);
            if plan.ignored > 0 {
                tracing::warn!(
                    "access profile: {} of its {} reads do not fit this image; passed over",
                    plan.ignored,
                    profile.reads.len()
                );
            }
            if jobs.is_empty() {
                return;
            }
            tracing::info!(
                "access profile: fetching {} spans and chunks in {} requests",
                plan.pieces,
                plan.requests
            );
            let jobs = Arc::new(jobs);
            let next = Arc::new(AtomicUsize::new(0));
            let done = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..PROFILE_JOBS.min(jobs.len()))
                .map(|_| {
                    let (jobs, next, done) = (jobs.clone(), next.clone(), done.clone());
                    let (fetcher, stop) = (fetcher.clone(), stop.clone());
                    fetcher.rt.clone().spawn_blocking(move || {
                        while !stop.is_cancelled() {
                            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                break;
                            };
                            done.fetch_add(run(&fetcher, job), Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = fetcher.rt.block_on(w);
            }
            tracing::info!(
                "access profile: {} spans and chunks fetched in {:.1?}{}",
                done.load(Ordering::Relaxed),
                t.elapsed(),
                if stop.is_cancelled() {
                    " (stopped: the view is gone)"
                } else {
                    ""
                }
            );
        });
    }
}

/// The requests that fetch what `profile` names in `layers`, in profile order: a span next
/// to one a request already holds joins that request (up to a sequential reader's widest
/// batch), so that a run read in any order is one request.
fn plan(profile: &Profile, layers: &[Arc<LayerData>]) -> (Vec<Job>, ProfilePlan) {
    let by_digest: HashMap<_, _> = layers.iter().map(|l| (&l.descriptor.digest, l)).collect();
    let mut out = ProfilePlan::default();
    let mut jobs: Vec<Job> = Vec::new();
    // Per layer id: the job that last took a span of it, for coalescing.
    let mut last: HashMap<u32, usize> = HashMap::new();
    let mut planned: HashSet<(u32, u64)> = HashSet::new();
    // The chunks of TOC layers by compressed offset, built on first use.
    let mut chunks: HashMap<u32, HashMap<u64, &Chunk>> = HashMap::new();
    for &(l, at) in &profile.reads {
        let Some(layer) = profile
            .layers
            .get(l as usize)
            .and_then(|d| by_digest.get(d))
        else {
            out.ignored += 1;
            continue;
        };
        if layer.src.is_local() || layer.local.get().is_some() {
            out.local += 1;
            continue;
        }
        if at >= layer.descriptor.size {
            out.ignored += 1;
            continue;
        }
        if let Some(toc) = &layer.toc {
            let by_offset = chunks.entry(layer.id).or_insert_with(|| {
                toc.chunks
                    .iter()
                    .flatten()
                    .filter(|c| !c.zeros)
                    .map(|c| (c.offset, c))
                    .collect()
            });
            match by_offset.get(&at) {
                Some(c) if planned.insert((layer.id, at)) => {
                    jobs.push(Job::Chunk((*layer).clone(), (*c).clone()));
                    out.pieces += 1;
                }
                Some(_) => {}
                None => out.ignored += 1,
            }
            continue;
        }
        let Ok(sp) = layer.seek() else {
            out.ignored += 1;
            continue;
        };
        // The span holding `at`: the one starting there when the profile was recorded
        // against this index, its nearest otherwise.
        let Some(k) = sp
            .checkpoints
            .partition_point(|c| c.in_offset <= at)
            .checked_sub(1)
        else {
            out.ignored += 1;
            continue;
        };
        if !planned.insert((layer.id, k as u64)) {
            continue;
        }
        out.pieces += 1;
        let size = layer.descriptor.size;
        let fits = |ks: &Range<usize>| {
            ks.len() < READAHEAD_MAX
                && sp.span_range(ks.end.max(k + 1) - 1, size).1
                    - sp.span_range(ks.start.min(k), size).0
                    <= MAX_RANGE
        };
        if let Some(&j) = last.get(&layer.id)
            && let Job::Spans(_, ks) = &mut jobs[j]
            && (ks.end == k || ks.start == k + 1)
            && fits(ks)
        {
            *ks = ks.start.min(k)..ks.end.max(k + 1);
            continue;
        }
        last.insert(layer.id, jobs.len());
        jobs.push(Job::Spans((*layer).clone(), k..k + 1));
    }
    out.requests = jobs.len();
    (jobs, out)
}

/// Fetch what `job` names that is neither stored nor on its way; returns how many spans
/// or chunks came in.
fn run(f: &Fetcher, job: &Job) -> usize {
    match job {
        Job::Chunk(layer, c) => {
            if f.cache.has_chunk(&c.digest) {
                return 0;
            }
            match f.toc_chunk(layer, c) {
                Ok(_) => 1,
                Err(e) => {
                    tracing::debug!("access profile: {e}");
                    0
                }
            }
        }
        Job::Spans(layer, ks) => {
            if layer.no_ranges.load(Ordering::Relaxed) || layer.local.get().is_some() {
                return 0;
            }
            let Ok(sp) = layer.seek() else { return 0 };
            let Some(digests) = sp.span_digests.get(ks.clone()) else {
                return 0;
            };
            let missing = |k: usize| {
                !f.gates.busy(&(layer.id, k)) && !f.cache.has_chunk(&digests[k - ks.start])
            };
            let mut fetched = 0;
            let mut k = ks.start;
            while k < ks.end {
                if !missing(k) {
                    k += 1;
                    continue;
                }
                let end = (k..ks.end)
                    .take_while(|&j| missing(j))
                    .last()
                    .map_or(k + 1, |j| j + 1);
                fetched += (end - k) - f.fetch_batch(layer, k..end).len();
                k = end;
            }
            fetched
        }
    }
}
