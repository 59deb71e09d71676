//! Request latencies by the tier that answered, and how long other instances served a replaced
//! version, kept per second for the last minutes: what the dashboard draws as p50 and p99 per
//! second (the chain's own latency figures are since the start). Each second holds the core's
//! [`LatencyHistogram`]s.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use userconfig::Answer;
use userconfig::{LatencyHistogram, LatencySummary};

/// Seconds kept.
pub(crate) const SECONDS: usize = 300;

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

#[derive(Default)]
struct Second {
    at: u64,
    tiers: [LatencyHistogram; 4],
    lag: LatencyHistogram,
}

/// What one second (or several together) held: per tier of [`TIERS`], and how long after a
/// change another instance still served the replaced version.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SecondSummary {
    pub(crate) latency: [LatencySummary; 4],
    pub(crate) lag: LatencySummary,
}

impl SecondSummary {
    fn of(s: &Second) -> Self {
        SecondSummary {
            latency: std::array::from_fn(|i| s.tiers[i].summary()),
            lag: s.lag.summary(),
        }
    }
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
        self.with_current(|s| s.tiers[tier_index(answer)].record(took));
    }

    /// A read that returned a replaced version, `after` the change that replaced it.
    pub(crate) fn record_lag(&self, after: Duration) {
        self.with_current(|s| s.lag.record(after));
    }

    /// The last completed second's summary (the one before the current), or an empty one.
    pub(crate) fn last_second(&self) -> SecondSummary {
        let now = self.now();
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        seconds
            .iter()
            .rev()
            .find(|s| s.at + 1 == now)
            .map(SecondSummary::of)
            .unwrap_or_default()
    }

    /// The summary of the last `span` completed seconds together.
    pub(crate) fn over(&self, span: u64) -> SecondSummary {
        let now = self.now();
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        let merged = Second::default();
        for s in seconds.iter().filter(|s| s.at < now && s.at + span >= now) {
            for (m, t) in merged.tiers.iter().zip(&s.tiers) {
                m.merge(t);
            }
            merged.lag.merge(&s.lag);
        }
        SecondSummary::of(&merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p50 = s.latency[1].p50_us;
        assert!((300.0..=375.0).contains(&p50), "{p50}");
        // The last minute merges the seconds in it.
        w.record_lag(Duration::from_millis(4));
        let minute = w.over(60);
        assert_eq!((minute.latency[1].count, minute.lag.count), (1, 0));
    }
}
