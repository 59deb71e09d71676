//! A small lock-free latency histogram for the chain's calls to each tier.
//!
//! Buckets are logarithmic: four per power of two of nanoseconds, so any recorded time is
//! reported within about 19% (one bucket) of its true value, from 1 ns to about 9 minutes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const SUB: u32 = 4;
const BUCKETS: usize = 40 * SUB as usize;

/// Latency percentiles of one tier's calls, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Calls measured.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// A latency histogram of atomics: recording is one `fetch_add` (and a `fetch_max`), safe from
/// any thread. The chain keeps one per tier; `userconfig serve`'s dashboard keeps one per
/// second and answering tier.
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    max_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_nanos: AtomicU64::new(0),
        }
    }
}

/// The bucket of `nanos`: four buckets per power of two.
fn bucket(nanos: u64) -> usize {
    if nanos < 2 {
        return 0;
    }
    let power = 63 - nanos.leading_zeros(); // floor(log2)
    let fraction = if power >= 2 {
        (nanos >> (power - 2)) & 0b11
    } else {
        (nanos << (2 - power)) & 0b11
    };
    ((power * SUB) as usize + fraction as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `index`, in nanoseconds.
fn upper_bound(index: usize) -> u64 {
    let power = index as u32 / SUB;
    let fraction = u64::from(index as u32 % SUB);
    let base = 1u64 << power;
    base + (base * (fraction + 1)) / u64::from(SUB)
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LatencyHistogram")
            .field(&self.summary())
            .finish()
    }
}

impl LatencyHistogram {
    /// Counts one call that took `took`.
    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket(nanos)].fetch_add(1, Ordering::Relaxed);
        self.max_nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Adds `other`'s calls to this histogram (to summarize several together).
    pub fn merge(&self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.max_nanos
            .fetch_max(other.max_nanos.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The percentiles of what was recorded (all zero, with `count` 0, for nothing).
    #[must_use]
    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let max = self.max_nanos.load(Ordering::Relaxed);
        let at = |p: f64| {
            let rank = ((p * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper_bound(i).min(max) as f64 / 1_000.0;
                }
            }
            max as f64 / 1_000.0
        };
        LatencySummary {
            count,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: max as f64 / 1_000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        let near = |got: f64, want: f64| (got - want).abs() / want < 0.2;
        assert!(near(s.p50_us, 500.0), "{s:?}");
        assert!(near(s.p90_us, 900.0), "{s:?}");
        assert!(near(s.p99_us, 990.0), "{s:?}");
        assert_eq!(s.max_us, 1000.0);
        assert_eq!(LatencyHistogram::default().summary().count, 0);
        // Below a microsecond too (a memory hit).
        let fast = LatencyHistogram::default();
        fast.record(Duration::from_nanos(300));
        let q = fast.summary().p50_us;
        assert!((0.3..=0.375).contains(&q), "{q}");
        let merged = LatencyHistogram::default();
        merged.record(Duration::from_micros(2000));
        merged.merge(&h);
        let m = merged.summary();
        assert_eq!((m.count, m.max_us), (1001, 2000.0));
        assert!(near(m.p50_us, 500.0), "{m:?}");
    }

    proptest! {
        #[test]
        fn a_value_lands_in_a_bucket_that_bounds_it(nanos in 2u64..(1 << 39)) {
            let i = bucket(nanos);
            prop_assert!(upper_bound(i) >= nanos, "{nanos} in {i} bounded by {}", upper_bound(i));
            prop_assert!(upper_bound(i) as f64 <= nanos as f64 * 1.26 + 1.0);
            if i > 0 {
                prop_assert!(bucket(nanos + nanos / 2) >= i);
            }
        }
    }
}
