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
use super::{ImageView, LayerData, Reader};
use crate::layer::format::Chunk;
use crate::profile::Profile;

/// Requests a profile keeps in flight: enough to fill a long fat link with the small
/// requests a program start makes, few enough not to crowd out the reads it makes itself.
pub const PROFILE_JOBS: usize = 6;

/// One request of a profile's replay, of layer `L` (generic for the planner's tests).
enum Job<L = Arc<LayerData>> {
    /// Consecutive spans of a seekable layer, in one range request.
    Spans(L, Range<usize>),
    /// One chunk of a TOC layer.
    Chunk(L, Chunk),
}

/// Where a span can join a planned request: span requests by (layer id, the span just
/// past their end) and by (layer id, their first span).
#[derive(Default)]
struct Joins {
    ends: HashMap<(u32, usize), usize>,
    starts: HashMap<(u32, usize), usize>,
}

impl Joins {
    /// Plan span `k` of layer `layer` (id `id`, not planned before): into a request of
    /// `jobs` it is next to, where `fits` allows the request's spans with it, else a new
    /// one. A request that then touches another of the layer takes that one in too, where
    /// `fits` allows: the earlier of the two in the plan keeps both, the later is left
    /// empty.
    fn add<L>(
        &mut self,
        jobs: &mut Vec<Job<L>>,
        layer: L,
        id: u32,
        k: usize,
        fits: impl Fn(&Range<usize>) -> bool,
    ) {
        let grown = |ks: &Range<usize>| ks.start.min(k)..ks.end.max(k + 1);
        let next_to = [self.ends.get(&(id, k)), self.starts.get(&(id, k + 1))];
        let join = next_to
            .into_iter()
            .flatten()
            .copied()
            .find(|&j| matches!(&jobs[j], Job::Spans(_, ks) if fits(&grown(ks))));
        let Some(j) = join else {
            self.ends.insert((id, k + 1), jobs.len());
            self.starts.insert((id, k), jobs.len());
            jobs.push(Job::Spans(layer, k..k + 1));
            return;
        };
        let mut run = self.take(&mut jobs[j], id);
        run = grown(&run);
        let mut keep = j;
        // The request on the other side of the new span joins too.
        let other = [
            self.starts.get(&(id, run.end)).copied(),
            self.ends.get(&(id, run.start)).copied(),
        ];
        if let Some(m) = other.into_iter().flatten().find(|&m| m != j)
            && let Job::Spans(_, ms) = &jobs[m]
        {
            let both = run.start.min(ms.start)..run.end.max(ms.end);
            if fits(&both) {
                self.take(&mut jobs[m], id);
                run = both;
                keep = j.min(m);
            }
        }
        if let Job::Spans(_, ks) = &mut jobs[keep] {
            *ks = run.clone();
        }
        self.ends.insert((id, run.end), keep);
        self.starts.insert((id, run.start), keep);
    }

    /// Empty span request `job` of layer `id` and forget where it was; returns its spans.
    fn take<L>(&mut self, job: &mut Job<L>, id: u32) -> Range<usize> {
        let Job::Spans(_, ks) = job else {
            return 0..0;
        };
        self.ends.remove(&(id, ks.end));
        self.starts.remove(&(id, ks.start));
        std::mem::replace(ks, 0..0)
    }
}

/// What a profile's plan holds, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProfilePlan {
    /// Requests planned (a run of adjacent spans is one).
    pub requests: usize,
    /// Spans and chunks they cover.
    pub reads: usize,
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
        self.reader.replay_profile(profile, self.layers.clone());
    }
}

impl Reader {
    /// [`ImageView::start_profile`] for `layers` opened through this reader one by one (the
    /// layer store serves an image's layers apart).
    pub fn replay_profile(&self, profile: Profile, layers: Vec<Arc<LayerData>>) {
        let r = self;
        let (fetcher, stop) = (r.fetcher.clone(), r.background.clone());
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
                plan.reads,
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
/// to those a request already holds joins that request (up to a sequential reader's widest
/// batch), so that a run read in any order — a program's libraries are — is one request,
/// made where the profile first needs any of it.
fn plan(profile: &Profile, layers: &[Arc<LayerData>]) -> (Vec<Job>, ProfilePlan) {
    let by_digest: HashMap<_, _> = layers.iter().map(|l| (&l.descriptor.digest, l)).collect();
    let mut out = ProfilePlan::default();
    let mut jobs: Vec<Job> = Vec::new();
    let mut joins = Joins::default();
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
                    out.reads += 1;
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
        out.reads += 1;
        let size = layer.descriptor.size;
        // No more spans than a sequential reader's widest batch, nor bytes than one range.
        let fits = |ks: &Range<usize>| {
            ks.len() <= READAHEAD_MAX
                && sp.span_range(ks.end - 1, size).1 - sp.span_range(ks.start, size).0 <= MAX_RANGE
        };
        joins.add(&mut jobs, (*layer).clone(), layer.id, k, fits);
    }
    // Requests another took in.
    jobs.retain(|j| !matches!(j, Job::Spans(_, ks) if ks.is_empty()));
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
            match f.toc_chunk_exact(layer, c) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The span requests `spans` (layer, span) plan to, at most `max` spans each.
    fn planned(spans: &[(u32, usize)], max: usize) -> Vec<(u32, Range<usize>)> {
        let (mut jobs, mut joins) = (Vec::new(), Joins::default());
        for &(l, k) in spans {
            joins.add(&mut jobs, l, l, k, |ks: &Range<usize>| ks.len() <= max);
        }
        jobs.into_iter()
            .filter_map(|j| match j {
                Job::Spans(l, ks) => (!ks.is_empty()).then_some((l, ks)),
                Job::Chunk(..) => None,
            })
            .collect()
    }

    #[test]
    fn a_run_read_in_any_order_is_one_request_where_it_is_first_needed() {
        // A program's libraries: spans 62, 58, 60, 63, 59, 61 of one layer, 5 of another.
        let got = planned(
            &[(0, 62), (1, 5), (0, 58), (0, 60), (0, 63), (0, 59), (0, 61)],
            16,
        );
        assert_eq!(got, vec![(0, 58..64), (1, 5..6)]);
        // Requests that meet become one, where the earlier was; each grows at either end.
        let got = planned(&[(0, 10), (0, 12), (0, 11), (0, 9), (0, 13)], 16);
        assert_eq!(got, vec![(0, 9..14)]);
        // Spans of other layers do not join.
        let got = planned(&[(0, 3), (1, 4), (1, 2)], 16);
        assert_eq!(got, vec![(0, 3..4), (1, 4..5), (1, 2..3)]);
    }

    #[test]
    fn a_request_stops_growing_at_its_bound() {
        let got = planned(&[(0, 1), (0, 2), (0, 3), (0, 4), (0, 0)], 3);
        assert_eq!(got, vec![(0, 1..4), (0, 4..5), (0, 0..1)]);
        // Two that meet but would pass the bound together stay apart.
        let got = planned(&[(0, 1), (0, 2), (0, 4), (0, 5), (0, 3)], 3);
        assert_eq!(got, vec![(0, 1..4), (0, 4..6)]);
    }
}
