//! Consistency you can see: a share of the reads the caches answer (1 in 1,000 by default) is
//! checked against the database's history after a grace period, and counted as consistent or
//! not, per tier; the share over the last hour is reported in nines (Meta's Polaris measures
//! cache consistency this way).
//!
//! A read served version `v` at time `t`. After `grace`, the database's history says whether a
//! newer change of the key had committed before `t - grace`: if so the copy served was stale
//! by more than the grace (the time the feed and the backplane are allowed to take), and the
//! read is inconsistent. Changes that committed within the grace before the read do not count
//! (they were on their way). The check is one indexed query of the history (at most 16 rows);
//! at most `max_checks_per_second` run (20 by default), one at a time, in a task of the
//! storage's own; samples past a full queue are dropped and counted, never queued without
//! bound. An inconsistency is logged at warn with the versions newer than the one served and
//! when they committed (never a value).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tiercache_core::{Version, WeakTieredCache};

use crate::Key;
use crate::config::UserConfig;

/// Default share of cache hits checked: one in this many.
pub const DEFAULT_CONSISTENCY_SAMPLE: u32 = 1000;
/// Default time after a read before it is checked, and the staleness it forgives.
pub const DEFAULT_CONSISTENCY_GRACE: Duration = Duration::from_secs(1);
/// Default most checks (database queries) a second.
pub const DEFAULT_CONSISTENCY_CHECKS_PER_SECOND: u32 = 20;

/// Samples waiting for their check, at most.
const QUEUE: usize = 1024;
/// History rows a check reads, at most.
const NEWER: usize = 16;
/// Minutes the nines are computed over.
const WINDOW_MINUTES: u64 = 60;

/// The tiers a read may be answered by from a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory = 0,
    Redis = 1,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Redis => "redis",
        }
    }
}

/// One read to check.
struct Sample {
    user: String,
    version: Version,
    tier: Tier,
    served: SystemTime,
    due: Instant,
}

/// The verifier's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// One read in this many is checked; 0: none.
    pub(crate) one_in: u32,
    pub(crate) grace: Duration,
    pub(crate) checks_per_second: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            one_in: DEFAULT_CONSISTENCY_SAMPLE,
            grace: DEFAULT_CONSISTENCY_GRACE,
            checks_per_second: DEFAULT_CONSISTENCY_CHECKS_PER_SECOND,
        }
    }
}

/// A storage's verifier (shared by its clones).
pub(crate) struct Verifier {
    settings: Settings,
    queue: Mutex<VecDeque<Sample>>,
    wake: tokio::sync::Notify,
    running: AtomicBool,
    checked: [AtomicU64; 2],
    inconsistent: [AtomicU64; 2],
    dropped: AtomicU64,
    failed: AtomicU64,
    /// Per minute (since the Unix epoch): checks and inconsistencies, the last hour's.
    minutes: Mutex<VecDeque<(u64, u64, u64)>>,
}

/// What the verifier counted, in [`CacheStats`](crate::CacheStats).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConsistencyStats {
    /// One cache hit in this many is checked (0: the verifier is off).
    pub sample_one_in: u32,
    /// The staleness forgiven, and the wait before a check, in milliseconds.
    pub grace_ms: u64,
    /// Reads checked, answered by the memory tier.
    pub checked_memory: u64,
    /// Reads checked, answered by Redis.
    pub checked_redis: u64,
    /// Of those, inconsistent (a copy replaced more than the grace before the read).
    pub inconsistent_memory: u64,
    /// Of those, inconsistent.
    pub inconsistent_redis: u64,
    /// Samples dropped: the queue was full (the checks' rate bound held).
    pub dropped: u64,
    /// Checks that could not read the database (not counted either way).
    pub failed: u64,
    /// Checks over the last hour.
    pub checked_last_hour: u64,
    /// Inconsistent reads over the last hour.
    pub inconsistent_last_hour: u64,
    /// `-log10(inconsistent / checked)` over the last hour; with none inconsistent, a lower
    /// bound, `log10(checked)`; `None` before any check.
    pub nines_last_hour: Option<f64>,
}

impl Verifier {
    pub(crate) fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Verifier {
            settings,
            queue: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            running: AtomicBool::new(false),
            checked: Default::default(),
            inconsistent: Default::default(),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            minutes: Mutex::new(VecDeque::new()),
        })
    }

    /// Whether this hit is one to check: one in `one_in`, drawn per read.
    #[inline]
    pub(crate) fn sampled(&self) -> bool {
        let one_in = self.settings.one_in;
        one_in != 0 && fastrand::u32(0..one_in) == 0
    }

    /// Queues a sampled read for its check (the task that checks starts with the first).
    #[cold]
    pub(crate) fn sample(
        self: &Arc<Self>,
        chain: WeakTieredCache<Key, UserConfig>,
        user: &str,
        version: Version,
        tier: Tier,
    ) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len() >= QUEUE {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            queue.push_back(Sample {
                user: user.to_owned(),
                version,
                tier,
                served: SystemTime::now(),
                due: Instant::now() + self.settings.grace,
            });
        }
        if !self.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(check_loop(Arc::downgrade(self), chain));
        }
        self.wake.notify_one();
    }

    fn record(&self, tier: Tier, consistent: bool) {
        self.checked[tier as usize].fetch_add(1, Ordering::Relaxed);
        if !consistent {
            self.inconsistent[tier as usize].fetch_add(1, Ordering::Relaxed);
        }
        let minute = unix_minute(SystemTime::now());
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        match minutes.back_mut() {
            Some((m, checked, bad)) if *m == minute => {
                *checked += 1;
                *bad += u64::from(!consistent);
            }
            _ => minutes.push_back((minute, 1, u64::from(!consistent))),
        }
        while minutes
            .front()
            .is_some_and(|(m, _, _)| *m + WINDOW_MINUTES <= minute)
        {
            minutes.pop_front();
        }
    }

    pub(crate) fn stats(&self) -> ConsistencyStats {
        let now = unix_minute(SystemTime::now());
        let (checked, bad) = self
            .minutes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(m, _, _)| m + WINDOW_MINUTES > now)
            .fold((0, 0), |(c, b), (_, checked, bad)| (c + checked, b + bad));
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsistencyStats {
            sample_one_in: self.settings.one_in,
            grace_ms: u64::try_from(self.settings.grace.as_millis()).unwrap_or(u64::MAX),
            checked_memory: load(&self.checked[0]),
            checked_redis: load(&self.checked[1]),
            inconsistent_memory: load(&self.inconsistent[0]),
            inconsistent_redis: load(&self.inconsistent[1]),
            dropped: load(&self.dropped),
            failed: load(&self.failed),
            checked_last_hour: checked,
            inconsistent_last_hour: bad,
            nines_last_hour: nines(checked, bad),
        }
    }
}

/// Consistency in nines: `-log10` of the inconsistent share of the reads checked; with none
/// inconsistent, the lower bound `log10(checked)`; `None` before any check.
#[must_use]
pub fn nines(checked: u64, inconsistent: u64) -> Option<f64> {
    if checked == 0 {
        return None;
    }
    Some(if inconsistent == 0 {
        (checked as f64).log10()
    } else {
        -(inconsistent as f64 / checked as f64).log10()
    })
}

fn unix_minute(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// Checks queued samples once due, at most `checks_per_second`, until the storage is dropped.
async fn check_loop(verifier: Weak<Verifier>, chain: WeakTieredCache<Key, UserConfig>) {
    loop {
        let Some(this) = verifier.upgrade() else {
            return;
        };
        let next = {
            let mut queue = this.queue.lock().unwrap_or_else(|p| p.into_inner());
            match queue.front() {
                Some(sample) if sample.due <= Instant::now() => queue.pop_front().map(Ok),
                Some(sample) => Some(Err(sample.due)),
                None => None,
            }
        };
        match next {
            Some(Ok(sample)) => {
                let Some(cache) = chain.upgrade() else { return };
                let pause = Duration::from_secs(1) / this.settings.checks_per_second.max(1);
                check(&this, &cache, sample).await;
                drop(cache);
                drop(this);
                tokio::time::sleep(pause).await;
            }
            Some(Err(due)) => {
                drop(this);
                tokio::time::sleep_until(due.into()).await;
            }
            None => {
                // Wait for a sample; once a second, see whether the storage is gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), this.wake.notified()).await;
            }
        }
    }
}

/// Whether the sampled read was consistent, by the database's history.
async fn check(
    verifier: &Verifier,
    cache: &tiercache_core::TieredCache<Key, UserConfig>,
    sample: Sample,
) {
    let source = cache.source();
    let history = cache
        .source_call("history", source.history(&sample.user, None, NEWER))
        .await;
    let revisions = match history {
        Ok(revisions) => revisions,
        Err(error) => {
            verifier.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%error, "a consistency check could not read the history");
            return;
        }
    };
    let newer: Vec<_> = revisions
        .iter()
        .filter(|r| r.version > sample.version)
        .collect();
    // The oldest change newer than the copy served: when it committed.
    let replaced_at = newer.iter().map(|r| r.at).min();
    let stale_since = replaced_at.and_then(|at| sample.served.duration_since(at).ok());
    let consistent = stale_since.is_none_or(|stale| stale <= verifier.settings.grace);
    verifier.record(sample.tier, consistent);
    if !consistent {
        let versions: Vec<String> = newer
            .iter()
            .rev()
            .map(|r| format!("{} at {}", r.version, crate::history::rfc3339(r.at)))
            .collect();
        tracing::warn!(
            user_id = %sample.user,
            tier = sample.tier.name(),
            served_version = sample.version,
            served_at = %crate::history::rfc3339(sample.served),
            stale_ms = stale_since.map_or(0, |d| d.as_millis()),
            newer = %versions.join(", "),
            "inconsistent read: a cache served a version replaced more than the grace before"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_are_the_inconsistent_share_or_a_lower_bound() {
        assert_eq!(nines(0, 0), None);
        assert_eq!(nines(1000, 1), Some(3.0));
        assert_eq!(
            nines(1000, 0),
            Some(3.0),
            "no inconsistency: at least log10(checked)"
        );
        assert!((nines(100, 10).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_hour_forgets_old_minutes() {
        let verifier = Verifier::new(Settings::default());
        verifier.record(Tier::Memory, true);
        verifier.record(Tier::Redis, false);
        verifier.minutes.lock().unwrap().push_front((
            unix_minute(SystemTime::now()) - WINDOW_MINUTES - 1,
            50,
            50,
        ));
        let stats = verifier.stats();
        assert_eq!(
            (stats.checked_last_hour, stats.inconsistent_last_hour),
            (2, 1)
        );
        assert_eq!((stats.checked_memory, stats.inconsistent_redis), (1, 1));
    }
}
