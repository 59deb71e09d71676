//! The live dashboard's figures: a task samples every instance's statistics once a second and
//! keeps the last five minutes; `GET /dashboard/data` returns them as JSON, which the page
//! (`assets/dashboard.html`, embedded in the binary) polls every second.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use userconfig::{CacheStats, UserConfigStorage};

use userconfig::LatencySummary;

use super::window::{SECONDS, TIERS, Window};

/// The page: one file, its script and style inline, so that a machine without internet shows
/// it.
pub(crate) const PAGE: &str = include_str!("../../assets/dashboard.html");

/// Sampling interval.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// Cumulative counts summed over the instances.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    requests: u64,
    memory_hits: u64,
    redis_hits: u64,
    redis_lookups: u64,
    database_loads: u64,
    database_writes: u64,
}

impl Totals {
    fn of(stats: &[CacheStats]) -> Self {
        let mut t = Totals::default();
        for s in stats {
            t.requests += s.chain.requests;
            if let Some(memory) = s.chain.tiers.first() {
                t.memory_hits += memory.hits;
            }
            if let Some(redis) = s.chain.tiers.get(1) {
                t.redis_hits += redis.hits;
                t.redis_lookups += redis.hits + redis.misses;
            }
            t.database_loads += s.database.loads;
            t.database_writes += s.chain.updates + s.chain.unchanged_writes;
        }
        t
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Hit rates, each `None` when nothing was asked of the tier.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct HitRates {
    /// Reads the memory tiers answered, of all reads.
    pub(crate) memory: Option<f64>,
    /// Reads Redis answered, of those it was asked (memory misses).
    pub(crate) redis: Option<f64>,
    /// Reads any cache answered, of all reads.
    pub(crate) cache: Option<f64>,
}

impl HitRates {
    fn between(before: Totals, after: Totals) -> Self {
        let requests = after.requests - before.requests;
        let memory = after.memory_hits - before.memory_hits;
        let redis = after.redis_hits - before.redis_hits;
        HitRates {
            memory: ratio(memory, requests),
            redis: ratio(redis, after.redis_lookups - before.redis_lookups),
            cache: ratio(memory + redis, requests),
        }
    }
}

/// A breaker's state, per instance and tier.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Breaker {
    instance: usize,
    tier: String,
    open: bool,
}

/// An instance's follower of the database's change feed.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Feed {
    instance: usize,
    connected: bool,
    elected: bool,
    changes: u64,
    flushes: u64,
    /// From a change's commit to its application here, since the start.
    lag: LatencySummary,
}

/// One second of every instance.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Unix time, milliseconds.
    t_ms: u64,
    requests_per_s: f64,
    hit_rate: HitRates,
    database_queries_per_s: f64,
    /// Per answering tier: `memory`, `redis`, `database`, `stale`.
    latency: BTreeMap<&'static str, LatencySummary>,
    /// How long after a change other instances served the replaced version (the simulator
    /// measures it; one `serve` instance has no other instance to compare with).
    lag: LatencySummary,
    memory_entries: u64,
    memory_capacity: u64,
    breakers: Vec<Breaker>,
    /// Each instance's follower of the change feed (none without one).
    feeds: Vec<Feed>,
}

/// What `GET /dashboard/data` returns.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Data {
    instances: usize,
    redis: bool,
    database: String,
    /// Since the start: every instance's reads, and the hit rates over them (what `/stats`
    /// reports per instance).
    requests_total: u64,
    hit_rate_total: HitRates,
    /// Over the last minute.
    hit_rate_minute: HitRates,
    latency_minute: BTreeMap<&'static str, LatencySummary>,
    lag_minute: LatencySummary,
    /// Each instance's consistency verifier (reads a cache answered, checked against the
    /// database's history).
    consistency: Vec<userconfig::ConsistencyStats>,
    samples: Vec<Sample>,
}

/// The dashboard's state, shared by the sampler and the handlers.
pub(crate) struct Board {
    storages: Vec<UserConfigStorage>,
    pub(crate) window: Arc<Window>,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    last: Option<(Totals, std::time::Instant)>,
    /// Totals at each sample, to compute the last minute's rates.
    totals: VecDeque<Totals>,
    samples: VecDeque<Sample>,
}

impl Board {
    pub(crate) fn new(storages: Vec<UserConfigStorage>, window: Arc<Window>) -> Arc<Self> {
        Arc::new(Board {
            storages,
            window,
            history: Mutex::new(History::default()),
        })
    }

    pub(crate) fn storages(&self) -> &[UserConfigStorage] {
        &self.storages
    }

    fn stats(&self) -> Vec<CacheStats> {
        self.storages
            .iter()
            .map(UserConfigStorage::get_cache_stats)
            .collect()
    }

    /// Takes one sample (the sampler calls it every [`TICK`]).
    pub(crate) fn sample(&self) {
        let stats = self.stats();
        let totals = Totals::of(&stats);
        let now = std::time::Instant::now();
        let second = self.window.last_second();
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((before, at)) = history.last.replace((totals, now)) else {
            history.totals.push_back(totals);
            return;
        };
        let elapsed = now.duration_since(at).as_secs_f64().max(1e-3);
        let sample = Sample {
            t_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            requests_per_s: (totals.requests - before.requests) as f64 / elapsed,
            hit_rate: HitRates::between(before, totals),
            database_queries_per_s: ((totals.database_loads + totals.database_writes)
                - (before.database_loads + before.database_writes))
                as f64
                / elapsed,
            latency: TIERS.iter().copied().zip(second.latency).collect(),
            lag: second.lag,
            memory_entries: stats.iter().map(|s| s.memory_cache.entries).sum(),
            memory_capacity: stats.iter().map(|s| s.memory_cache.max_size).sum(),
            breakers: stats
                .iter()
                .enumerate()
                .flat_map(|(instance, s)| {
                    s.chain
                        .tiers
                        .iter()
                        .chain(std::iter::once(&s.chain.source))
                        .map(move |t| Breaker {
                            instance,
                            tier: t.name.clone(),
                            open: t.breaker_open,
                        })
                })
                .collect(),
            feeds: stats
                .iter()
                .enumerate()
                .filter_map(|(instance, s)| {
                    let feed = s.chain.feed.as_ref()?;
                    Some(Feed {
                        instance,
                        connected: feed.connected,
                        elected: feed.elected,
                        changes: s.chain.feed_changes,
                        flushes: s.chain.feed_flushes,
                        lag: feed.lag,
                    })
                })
                .collect(),
        };
        history.samples.push_back(sample);
        history.totals.push_back(totals);
        while history.samples.len() > SECONDS {
            history.samples.pop_front();
        }
        while history.totals.len() > 61 {
            history.totals.pop_front();
        }
    }

    /// The figures the page draws.
    pub(crate) fn data(&self) -> Data {
        let stats = self.stats();
        let totals = Totals::of(&stats);
        let minute = self.window.over(60);
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let minute_ago = history.totals.front().copied().unwrap_or_default();
        Data {
            instances: self.storages.len(),
            redis: stats.iter().any(|s| s.redis_cache.enabled),
            database: stats
                .first()
                .map(|s| s.database.backend.clone())
                .unwrap_or_default(),
            requests_total: totals.requests,
            hit_rate_total: HitRates::between(Totals::default(), totals),
            hit_rate_minute: HitRates::between(minute_ago, totals),
            latency_minute: TIERS.iter().copied().zip(minute.latency).collect(),
            lag_minute: minute.lag,
            consistency: stats.iter().map(|s| s.consistency.clone()).collect(),
            samples: history.samples.iter().cloned().collect(),
        }
    }
}

/// Samples `board` every [`TICK`] while something else holds it (the router's state).
pub(crate) fn spawn_sampler(board: &Arc<Board>) -> tokio::task::JoinHandle<()> {
    let board = Arc::downgrade(board);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(board) = board.upgrade() else { return };
            board.sample();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rates_are_shares_of_what_each_tier_was_asked() {
        let before = Totals {
            requests: 100,
            memory_hits: 50,
            redis_hits: 10,
            redis_lookups: 50,
            ..Totals::default()
        };
        let after = Totals {
            requests: 200,
            memory_hits: 140,
            redis_hits: 14,
            redis_lookups: 60,
            ..Totals::default()
        };
        let r = HitRates::between(before, after);
        assert_eq!(r.memory, Some(0.9));
        assert_eq!(r.redis, Some(0.4));
        assert_eq!(r.cache, Some(0.94));
        assert_eq!(HitRates::between(after, after).memory, None);
    }
}
