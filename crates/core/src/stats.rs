//! Statistics: per tier, per chain, serializable, and counted without a shared hot counter.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// What a tier reports about itself. Field names follow the seed design's `memory_cache` block
/// (`entries`, `max_size`, `hits`, `misses`, `hit_rate`, `total_requests`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TierStats {
    /// The tier's name.
    pub name: String,
    /// Entries held now (including expired ones not yet removed), if the tier knows.
    pub entries: Option<u64>,
    /// Capacity in entries, if bounded.
    pub max_size: Option<u64>,
    /// Lookups that found a fresh entry.
    pub hits: u64,
    /// Lookups that found nothing fresh.
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 when there were no lookups.
    pub hit_rate: f64,
    /// `hits + misses`.
    pub total_requests: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    /// Entries found corrupt, deleted and counted as misses.
    pub corrupt: u64,
    /// Sets refused because the tier held a newer version or a tombstone.
    pub rejected_sets: u64,
}

impl TierStats {
    /// Stats for `name` with the given lookup counts; `hit_rate` and `total_requests` are
    /// derived.
    #[must_use]
    pub fn new(name: impl Into<String>, hits: u64, misses: u64) -> Self {
        TierStats {
            name: name.into(),
            hits,
            misses,
            total_requests: hits + misses,
            hit_rate: hit_rate(hits, misses),
            ..TierStats::default()
        }
    }

    /// Sets `entries` and `max_size`.
    #[must_use]
    pub fn with_size(mut self, entries: u64, max_size: Option<u64>) -> Self {
        self.entries = Some(entries);
        self.max_size = max_size;
        self
    }

    /// Sets `errors`.
    #[must_use]
    pub fn with_errors(mut self, errors: u64) -> Self {
        self.errors = errors;
        self
    }

    /// Sets `evictions`, `corrupt` and `rejected_sets`.
    #[must_use]
    pub fn with_housekeeping(mut self, evictions: u64, corrupt: u64, rejected_sets: u64) -> Self {
        self.evictions = evictions;
        self.corrupt = corrupt;
        self.rejected_sets = rejected_sets;
        self
    }
}

/// `hits / (hits + misses)`, or 0 with no lookups.
#[must_use]
pub fn hit_rate(hits: u64, misses: u64) -> f64 {
    let total = hits + misses;
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// The chain's view of one tier: what happened when the chain asked it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChainTierStats {
    /// The tier's name.
    pub name: String,
    /// Requests this tier answered.
    pub hits: u64,
    /// Lookups at this tier that found nothing.
    pub misses: u64,
    /// Lookups, sets and invalidations that failed (timeouts included).
    pub errors: u64,
    /// Of `errors`, those that were timeouts.
    pub timeouts: u64,
    /// Calls not made because the tier's circuit breaker was open.
    pub skipped: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
    /// How many times the breaker opened.
    pub breaker_opened: u64,
    /// Invalidations this tier missed, waiting to be replayed before it is read again.
    pub pending_repairs: u64,
    /// Time of the chain's calls to this tier (the synchronous `peek` path is not timed: a
    /// memory hit costs tens of nanoseconds, less than reading a clock precisely).
    pub latency: crate::latency::LatencySummary,
    /// `hits / (hits + misses)`.
    pub hit_rate: f64,
    /// What the tier reports about itself.
    pub tier: TierStats,
}

/// Statistics of a [`TieredCache`](crate::TieredCache).
///
/// Every request ends in exactly one outcome, so
/// `requests == sum(tiers[i].hits) + source.hits + not_found + stale_served + failed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChainStats {
    /// Requests made through `get` (each key of a `get_many` counts once).
    pub requests: u64,
    /// One entry per cache tier, top first.
    pub tiers: Vec<ChainTierStats>,
    /// The source: `hits` are requests it answered, `misses` keys it did not have.
    pub source: ChainTierStats,
    /// Requests answered "not found" (by the source, or by a cached "not found").
    pub not_found: u64,
    /// Requests answered with a stale copy because the source failed.
    pub stale_served: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Source loads actually run (after coalescing).
    pub source_loads: u64,
    /// Requests that joined another caller's load instead of starting their own.
    pub coalesced: u64,
    /// Updates and deletes that changed the source.
    pub updates: u64,
    /// Changes applied from the source's feed (every committed change, by any writer, this
    /// chain's own included), whether this chain's follower read them or the follower the
    /// source elected relayed them.
    pub feed_changes: u64,
    /// Times the feed said changes may have been lost (or every key changed), and every cache
    /// tier was emptied.
    pub feed_flushes: u64,
    /// Updates whose value equalled the stored one (and deletes of keys with nothing stored):
    /// the source committed nothing, no cache was invalidated, nothing was published.
    pub unchanged_writes: u64,
    /// Hits refused because they were older than a version this chain wrote (a tier that missed
    /// an invalidation).
    pub refused_stale_versions: u64,
    /// Invalidations that could not be handed to the backplane.
    pub backplane_errors: u64,
    /// Invalidations received from other instances.
    pub remote_invalidations: u64,
    /// Back-fills skipped (or taken back) because their key was updated or invalidated in this
    /// chain after the load that read it began.
    #[serde(default)]
    pub backfills_skipped: u64,
    /// Loads running now (single-flight entries).
    #[serde(default)]
    pub loads_in_flight: u64,
    /// Requests in those loads now: the caller running each, and those waiting for it.
    #[serde(default)]
    pub load_callers: u64,
    /// Background tasks running now: updates and invalidations whose caller left, back-fills,
    /// writes being settled.
    #[serde(default)]
    pub background_tasks: u64,
    /// Version floors alive (left by writes that could not reach every cache tier).
    #[serde(default)]
    pub floors: u64,
    /// The source's change feed as this chain follows it; `None` when the chain does not
    /// follow one.
    #[serde(default)]
    pub feed: Option<FeedStats>,
    /// `sum(tiers[i].hits) / requests`: the share of requests the caches answered.
    pub cache_hit_rate: f64,
}

/// How a chain's follower of the source's change feed is doing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedStats {
    /// Whether the follower is connected (changes arrive as they commit). While it is not,
    /// changes are caught up (or, past the log's retention, every cache emptied) when it is
    /// again.
    pub connected: bool,
    /// Whether this chain's follower is the one elected to read the source's log for every
    /// instance (it applies each change to the shared tiers, once for the fleet).
    pub elected: bool,
    /// From a change's commit (the time its log entry was written) to this chain having
    /// applied it, over every change that carried the time.
    pub lag: crate::latency::LatencySummary,
}

/// Stripes owned by one thread each; a thread that finds them all taken shares the overflow
/// stripe.
const OWNED_STRIPES: usize = 32;

/// A counter with one cache line per thread, so that counting on the hot path is a plain
/// load-add-store on a line no other thread writes, not a locked read-modify-write on a shared
/// one. Reads sum the stripes.
///
/// Each thread owns one of 32 stripes for as long as it lives (the stripe goes back to a free
/// list when the thread exits); threads beyond 32 at once share an overflow stripe with atomic
/// adds. No count is ever lost.
pub struct Counter {
    stripes: Box<[Stripe]>,
}

#[derive(Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

/// This thread's stripe: [`UNASSIGNED`] until its first count, [`OVERFLOW`] if all stripes
/// were taken (or the thread is exiting). A `const` thread-local without a destructor, so that
/// reading it on the hot path is a single load.
const UNASSIGNED: usize = usize::MAX;
const OVERFLOW: usize = OWNED_STRIPES;

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(UNASSIGNED) };
    /// Gives this thread's stripe back when the thread exits.
    static LEASE: StripeLease = const { StripeLease };
}

static FREE_STRIPES: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

struct StripeLease;

impl Drop for StripeLease {
    fn drop(&mut self) {
        let _ = STRIPE.try_with(|stripe| {
            let owned = stripe.replace(OVERFLOW);
            if owned < OWNED_STRIPES {
                FREE_STRIPES
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(owned);
            }
        });
    }
}

/// The stripe this thread counts on, leasing one on first use.
#[inline]
fn my_stripe() -> usize {
    let current = STRIPE.try_with(Cell::get).unwrap_or(OVERFLOW);
    if current != UNASSIGNED {
        return current;
    }
    lease_stripe()
}

#[cold]
fn lease_stripe() -> usize {
    let popped = FREE_STRIPES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    let index = popped.unwrap_or_else(|| {
        let next = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed);
        if next < OWNED_STRIPES {
            next
        } else {
            NEXT_STRIPE.store(OWNED_STRIPES, Ordering::Relaxed);
            OVERFLOW
        }
    });
    // Register the give-back before publishing the lease; if the thread is already tearing
    // down its thread-locals, count on the shared stripe instead.
    if LEASE.try_with(|_| ()).is_err() {
        if index < OWNED_STRIPES {
            FREE_STRIPES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(index);
        }
        return OVERFLOW;
    }
    let _ = STRIPE.try_with(|stripe| stripe.set(index));
    index
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            stripes: (0..=OWNED_STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

impl Counter {
    /// Adds one.
    #[inline]
    pub fn incr(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        let i = my_stripe();
        let stripe = &self.stripes[i].0;
        if i < OWNED_STRIPES {
            // Only this thread writes this stripe, so a relaxed load and store cannot lose a
            // count, and readers on other threads still see a well-formed value.
            stripe.store(stripe.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        } else {
            stripe.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The sum of all stripes.
    #[must_use]
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counter").field(&self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hit_rate_handles_zero() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(3, 1), 0.75);
        let s = TierStats::new("memory", 3, 1).with_size(2, Some(500));
        assert_eq!(s.total_requests, 4);
        assert_eq!(s.max_size, Some(500));
    }

    #[test]
    fn counter_loses_nothing_with_more_threads_than_stripes() {
        let c = Arc::new(Counter::default());
        let barrier = Arc::new(std::sync::Barrier::new(OWNED_STRIPES + 8));
        let handles: Vec<_> = (0..OWNED_STRIPES + 8)
            .map(|_| {
                let (c, barrier) = (Arc::clone(&c), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait(); // all alive at once: some share the overflow stripe
                    for _ in 0..1000 {
                        c.incr();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.get(), (OWNED_STRIPES as u64 + 8) * 1000);
        // Stripes of exited threads are reused, and still lose nothing.
        let again: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || c.add(5))
            })
            .collect();
        for h in again {
            h.join().unwrap();
        }
        assert_eq!(c.get(), (OWNED_STRIPES as u64 + 8) * 1000 + 20);
    }

    #[test]
    fn counter_sums_across_threads() {
        let c = Arc::new(Counter::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.incr();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(c.get(), 4000);
    }

    #[test]
    fn stats_serialize_in_the_seed_shape() {
        let s = TierStats::new("memory", 1547, 203).with_size(245, Some(500));
        let json = serde_json::to_value(&s).unwrap();
        for field in [
            "entries",
            "max_size",
            "hits",
            "misses",
            "hit_rate",
            "total_requests",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["total_requests"], 1750);
    }
}
