//! Request latencies by the tier that answered, and how long other instances served a replaced
//! version, kept per second for the last minutes: what the dashboard draws as p50 and p99 per
//! second (the chain's own latency figures are since the start).

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use userconfig::Answer;

/// Seconds kept.
pub(crate) const SECONDS: usize = 300;
/// Buckets per power of two of nanoseconds (a memory hit takes well under a microsecond): a
/// time is reported within about 19%, up to 2^44 ns (about 5 hours).
const SUB: u32 = 4;
const BUCKETS: usize = 44 * SUB as usize;

/// The answering tiers the window tells apart, in this order.
pub(crate) const TIERS: [&str; 4] = ["memory", "redis", "database", "stale"];

fn tier_index(answer: Answer) -> usize {
    match answer {
        Answer::Memory => 0,
        Answer::Redis => 1,
        Answer::Stale => 3,
        // The database, and any answer a later release adds.
        _ => 2,
    }
}

#[derive(Clone)]
struct Histogram {
    counts: Vec<u32>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

fn bucket(nanos: u64) -> usize {
    if nanos < 2 {
        return nanos as usize;
    }
    let power = 63 - nanos.leading_zeros();
    let fraction = if power >= 2 {
        (nanos >> (power - 2)) & 0b11
    } else {
        (nanos << (2 - power)) & 0b11
    };
    ((power * SUB) as usize + fraction as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `index`, in nanoseconds.
fn upper_bound(index: usize) -> f64 {
    let power = index as u32 / SUB;
    let fraction = (index as u32 % SUB) as f64;
    if power < 2 {
        return index as f64;
    }
    2f64.powi(power as i32) * (1.0 + (fraction + 1.0) / f64::from(SUB))
}

impl Histogram {
    fn record(&mut self, nanos: u64) {
        let b = bucket(nanos);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.total += 1;
    }

    /// The `q` quantile, in microseconds.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(upper_bound(i) / 1000.0);
            }
        }
        Some(upper_bound(BUCKETS - 1) / 1000.0)
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
    }
}

#[derive(Clone, Default)]
struct Second {
    at: u64,
    tiers: [Histogram; 4],
    lag: Histogram,
}

/// p50 and p99 of one second (or window), in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Quantiles {
    pub(crate) count: u64,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
}

impl Quantiles {
    fn of(h: &Histogram) -> Self {
        Quantiles {
            count: h.total,
            p50_us: h.quantile(0.5),
            p99_us: h.quantile(0.99),
        }
    }
}

/// What one second held.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SecondSummary {
    /// Per tier of [`TIERS`].
    pub(crate) latency: [Quantiles; 4],
    /// How long after a change another instance still served the replaced version.
    pub(crate) lag: Quantiles,
}

/// Latencies per answering tier and invalidation lag, per second, for the last
/// [`SECONDS`] seconds. Cheap to record into (one uncontended lock and an add).
pub(crate) struct Window {
    started: Instant,
    seconds: Mutex<VecDeque<Second>>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            started: Instant::now(),
            seconds: Mutex::new(VecDeque::with_capacity(SECONDS + 1)),
        }
    }
}

impl Window {
    fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn with_current(&self, f: impl FnOnce(&mut Second)) {
        let now = self.now();
        let mut seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        if seconds.back().is_none_or(|s| s.at != now) {
            seconds.push_back(Second {
                at: now,
                ..Second::default()
            });
            while seconds.len() > SECONDS {
                seconds.pop_front();
            }
        }
        f(seconds.back_mut().expect("just pushed"));
    }

    /// A read answered by `answer` in `took`.
    pub(crate) fn record(&self, answer: Answer, took: Duration) {
        let nanos = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.with_current(|s| s.tiers[tier_index(answer)].record(nanos));
    }

    /// A read that returned a replaced version, `after` the change that replaced it.
    pub(crate) fn record_lag(&self, after: Duration) {
        let nanos = after.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.with_current(|s| s.lag.record(nanos));
    }

    /// The last completed second's summary (the one before the current), or an empty one.
    pub(crate) fn last_second(&self) -> SecondSummary {
        let now = self.now();
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        seconds
            .iter()
            .rev()
            .find(|s| s.at + 1 == now)
            .map(|s| SecondSummary {
                latency: std::array::from_fn(|i| Quantiles::of(&s.tiers[i])),
                lag: Quantiles::of(&s.lag),
            })
            .unwrap_or_default()
    }

    /// The summary of the last `span` completed seconds together.
    pub(crate) fn over(&self, span: u64) -> SecondSummary {
        let now = self.now();
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        let mut merged = Second::default();
        for s in seconds.iter().filter(|s| s.at < now && s.at + span >= now) {
            for (m, t) in merged.tiers.iter_mut().zip(&s.tiers) {
                m.merge(t);
            }
            merged.lag.merge(&s.lag);
        }
        SecondSummary {
            latency: std::array::from_fn(|i| Quantiles::of(&merged.tiers[i])),
            lag: Quantiles::of(&merged.lag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(us * 1000);
        }
        // Below a microsecond too (memory hits).
        let mut fast = Histogram::default();
        fast.record(300);
        let q = fast.quantile(0.5).unwrap();
        assert!((0.3..=0.375).contains(&q), "{q}");
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((500.0..=500.0 * 1.25).contains(&p50), "p50 {p50}");
        assert!((990.0..=990.0 * 1.25).contains(&p99), "p99 {p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn a_second_is_reported_once_it_is_over() {
        let w = Window {
            started: Instant::now() - Duration::from_secs(5),
            ..Window::default()
        };
        w.record(Answer::Redis, Duration::from_micros(300));
        // The current second is not reported yet.
        assert_eq!(w.last_second().latency[1].count, 0);
        let mut seconds = w.seconds.lock().unwrap();
        seconds.back_mut().unwrap().at -= 1;
        drop(seconds);
        let s = w.last_second();
        assert_eq!(s.latency[1].count, 1);
        assert_eq!(s.latency[0].count, 0);
        let p50 = s.latency[1].p50_us.unwrap();
        assert!((300.0..=375.0).contains(&p50), "{p50}");
    }
}
