//! Statistics: per tier, per chain, serializable, and counted without a shared hot counter.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
    /// Updates written to the source.
    pub updates: u64,
    /// Hits refused because they were older than a version this chain wrote (a tier that missed
    /// an invalidation).
    pub refused_stale_versions: u64,
    /// `sum(tiers[i].hits) / requests`: the share of requests the caches answered.
    pub cache_hit_rate: f64,
}

const STRIPES: usize = 16;

/// A counter striped over cache lines, so that threads counting at once do not fight over one
/// line. Each thread writes its own stripe; reads sum them.
#[derive(Default)]
pub struct Counter {
    stripes: [Stripe; STRIPES],
}

#[derive(Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = Cell::new(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES);
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
        let i = STRIPE.with(Cell::get);
        self.stripes[i].0.fetch_add(n, Ordering::Relaxed);
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
