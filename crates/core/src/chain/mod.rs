//! [`TieredCache`]: the chain of cache tiers over an authoritative source.
//!
//! One file per path: `read.rs` (get, fetch, batches, warming, back-fill, fail-safe),
//! `write.rs` (update, conditional update, delete, writes of unknown outcome, publish),
//! `invalidate.rs` (manual invalidation, replays, clears), `remote.rs` (the one door for
//! remote changes: the source's feed and the backplane), `feed.rs` (following the source's
//! feed), `steps.rs` (what those paths share: may a tier serve a key, a marked fill and its
//! taking back, an invalidation at a version, a floor), `level.rs` (one tier's limit,
//! breaker and counters), `repairs.rs` (what a tier missed and its replay), `observe.rs` (the
//! broadcast of every change the chain learns of), `marks.rs` (what changed since
//! a load began), `floors.rs`, `tasks.rs` (background work) and `builder.rs`.

mod builder;
mod feed;
mod floors;
mod invalidate;
mod level;
mod marks;
mod observe;
mod read;
mod remote;
mod repairs;
mod steps;
mod tasks;
mod write;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use self::builder::TieredCacheBuilder;
use self::floors::Floors;
use self::level::Level;
use self::marks::Marks;
pub use self::observe::OBSERVER_BUFFER;
use self::observe::Observers;
pub use self::repairs::DEFAULT_MAX_PENDING_REPAIRS;
use self::tasks::Tasks;
use crate::backplane::Backplane;
use crate::breaker::BreakerPolicy;
use crate::clock::Clock;
use crate::entry::{Entry, Version};
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::source::Source;
use crate::stats::{ChainStats, ChainTierStats, Counter, hit_rate};
use crate::tier::{CacheTier, Key, Value};

/// Default time limit of a call to a cache tier.
pub const DEFAULT_TIER_TIMEOUT: Duration = Duration::from_millis(250);
/// Default time limit of a call to the source: a read that cannot be answered fails within it.
pub const DEFAULT_SOURCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time to live of a cached "not found".
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Default oldest stale copy served when the source fails.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(300);
/// Default life of a version floor left by a write that could not reach every cache tier.
pub const DEFAULT_FLOOR_TTL: Duration = Duration::from_secs(1800);
/// Default time a write whose outcome is unknown (it timed out, or lost its connection) may
/// still take to commit in the source after the chain gave up on it.
pub const DEFAULT_WRITE_SETTLE: Duration = Duration::from_secs(5);

/// Which level answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// Cache tier `index` (0 is the top) held a fresh entry.
    Tier(usize),
    /// The source answered.
    Source,
    /// The source failed; cache tier `index` served a stale copy within the max-stale age.
    Stale(usize),
}

/// A request's answer with its version and where it came from.
pub struct Fetched<V> {
    /// The value, or `None` when the source does not have the key.
    pub value: Option<Arc<V>>,
    /// The source's version of the value (0 for "not found").
    pub version: Version,
    /// Which level answered.
    pub origin: Origin,
}

impl<V> Fetched<V> {
    fn from_entry(entry: Entry<V>, origin: Origin) -> Self {
        Fetched {
            value: entry.value,
            version: entry.version,
            origin,
        }
    }

    /// Whether the source had the key.
    #[must_use]
    pub fn is_found(&self) -> bool {
        self.value.is_some()
    }
}

impl<V> Clone for Fetched<V> {
    fn clone(&self) -> Self {
        Fetched {
            value: self.value.clone(),
            version: self.version,
            origin: self.origin,
        }
    }
}

impl<V> fmt::Debug for Fetched<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("found", &self.value.is_some())
            .field("version", &self.version)
            .field("origin", &self.origin)
            .finish()
    }
}

/// A request that [`TieredCache::peek`] could not answer: where the asynchronous path goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "hand it to TieredCache::fetch_after"]
pub struct Miss {
    start: usize,
}

/// The top tier's synchronous answer.
enum Top<V> {
    Hit(Entry<V>),
    /// Go on from this cache tier.
    Continue(usize),
}

/// The chain's policy knobs; see the builder's setters for their meaning and defaults.
#[derive(Debug, Clone)]
struct Policy {
    breaker: BreakerPolicy,
    background_backfill: bool,
    single_flight: bool,
    negative_ttl: Option<Duration>,
    max_stale: Option<Duration>,
    floor_ttl: Duration,
    write_settle: Duration,
    max_pending_repairs: usize,
    /// The longest cache tier time limit: how long a fill may still be on its way to a tier.
    fill_grace: Duration,
}

#[derive(Default)]
struct ChainCounters {
    source_found: Counter,
    not_found: Counter,
    stale_served: Counter,
    failed: Counter,
    source_loads: Counter,
    coalesced: Counter,
    updates: Counter,
    unchanged: Counter,
    refused: Counter,
    backplane_errors: Counter,
    remote_invalidations: Counter,
    backfills_skipped: Counter,
    feed_changes: Counter,
    feed_flushes: Counter,
}

struct Inner<K, V> {
    tiers: Vec<Level<K, V>>,
    source: Level<K, V, dyn Source<K, V>>,
    clock: Clock,
    policy: Policy,
    flights: Flights<K, Result<Fetched<V>>>,
    floors: Floors<K>,
    backplane: Option<Arc<dyn Backplane<K, V>>>,
    /// Which keys changed since a load began (see `marks.rs`).
    marks: Marks<K>,
    /// Background work, counted for [`TieredCache::flush`].
    tasks: Arc<Tasks>,
    counters: ChainCounters,
    /// How the source's feed follower is doing.
    feed_health: feed::Health,
    /// From a change's commit to its application here.
    feed_lag: crate::latency::LatencyHistogram,
    /// Whoever follows the changes this chain learns of (`observe.rs`).
    observers: Observers<K, V>,
    /// Dropped with the chain: stops the task that applies the source's change feed.
    _feed_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A read-through chain of cache tiers over an authoritative source.
///
/// * **Read** ([`get`](TieredCache::get)): tiers top to bottom; a hit at tier `i` back-fills tiers
///   `0..i`, each capping the entry's remaining time to live with its own TTL. On a miss
///   everywhere the source answers and every tier is back-filled. Concurrent misses of one key
///   share one load (single-flight). A failing cache tier is counted and skipped; if the source
///   is unreachable or slow, a stale copy within the max-stale age is served, else
///   [`Error::SourceUnavailable`]; its other errors (corrupt data) are returned as they are.
/// * **Write** ([`update`](TieredCache::update)): the source first (on failure nothing else is
///   touched), then every cache tier, bottom first, is invalidated at the previous version and
///   repopulated with the new one. Tombstones and version checks in the tiers, and the chain's
///   record of what changed since a load began, keep a slow reader from back-filling an older
///   value afterwards.
/// * **Cancellation**: an update or an invalidation runs in a task of its own, so a caller
///   that gives up at any `.await` (a timeout, a dropped request) never leaves it half done;
///   a write whose outcome is unknown (timed out, connection lost) is settled by invalidating
///   the key everywhere now and again once the source can no longer commit it.
///
/// Cheap to clone; clones share everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::TieredCache;
/// use tiercache_testkit::FakeSource;
///
/// let source = FakeSource::new("db"); // your database
/// let cache: TieredCache<String, String> = TieredCache::builder().source(source).build()?;
///
/// let version = cache.update(&"alice".to_string(), Arc::new("dark".to_string())).await?;
/// assert_eq!(version, 1);
/// let theme = cache.get(&"alice".to_string()).await?;
/// assert_eq!(theme.as_deref().map(String::as_str), Some("dark"));
/// # Ok(())
/// # }
/// ```
pub struct TieredCache<K, V> {
    inner: Arc<Inner<K, V>>,
}

/// A handle to a [`TieredCache`] that does not keep it alive (for background tasks such as a
/// backplane subscriber, which must stop when the chain is dropped).
pub struct WeakTieredCache<K, V> {
    inner: std::sync::Weak<Inner<K, V>>,
}

impl<K, V> Clone for WeakTieredCache<K, V> {
    fn clone(&self) -> Self {
        WeakTieredCache {
            inner: self.inner.clone(),
        }
    }
}

impl<K, V> WeakTieredCache<K, V> {
    /// The chain, if it is still alive.
    #[must_use]
    pub fn upgrade(&self) -> Option<TieredCache<K, V>> {
        self.inner.upgrade().map(|inner| TieredCache { inner })
    }
}

impl<K, V> Clone for TieredCache<K, V> {
    fn clone(&self) -> Self {
        TieredCache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Key, V: Value> fmt::Debug for TieredCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inner.tiers.iter().map(|l| l.name.as_str()).collect();
        f.debug_struct("TieredCache")
            .field("tiers", &names)
            .field("source", &self.inner.source.name)
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl<K: Key, V: Value> TieredCache<K, V> {
    /// A handle that does not keep the chain alive.
    #[must_use]
    pub fn downgrade(&self) -> WeakTieredCache<K, V> {
        WeakTieredCache {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Starts a chain: add cache tiers top first, then the source.
    pub fn builder() -> TieredCacheBuilder<K, V> {
        TieredCacheBuilder::new()
    }

    /// Waits, for at most `within`, for the work that outlives its callers: updates and
    /// invalidations still running, background back-fills, the replay of invalidations the
    /// cache tiers missed, and the messages the backplane has queued. Call it before a process
    /// exits (a command-line tool, a service shutting down).
    ///
    /// # Errors
    /// [`Error::Unfinished`] for the first tier (or the backplane, or `chain` for tasks still
    /// running) that is still behind at the deadline, with how much is left.
    pub async fn flush(&self, within: Duration) -> Result<()> {
        let inner = &*self.inner;
        let deadline = tokio::time::Instant::now() + within;
        let tasks_done = inner.tasks.idle(deadline).await;
        loop {
            if inner.tiers.iter().all(|l| l.repairs.len() == 0)
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = match &inner.backplane {
            Some(backplane) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                backplane.flush(left).await
            }
            None => Ok(()),
        };
        if !tasks_done && inner.tasks.running() > 0 {
            return Err(Error::Unfinished {
                tier: "chain".into(),
                what: "tasks",
                pending: inner.tasks.running() as u64,
            });
        }
        // A tier still holding what it should have dropped matters more than a message.
        for level in &inner.tiers {
            let pending = level.repairs.len();
            if pending > 0 {
                return Err(Error::Unfinished {
                    tier: level.name.clone(),
                    what: "invalidations",
                    pending: pending as u64,
                });
            }
        }
        sent?;
        Ok(())
    }

    /// The cache tiers, top first.
    pub fn tiers(&self) -> impl ExactSizeIterator<Item = &Arc<dyn CacheTier<K, V>>> {
        self.inner.tiers.iter().map(|l| &l.tier)
    }

    /// The authoritative source.
    #[must_use]
    pub fn source(&self) -> &Arc<dyn Source<K, V>> {
        &self.inner.source.tier
    }

    /// Runs `call`, a call to the [`source`](Self::source) that the chain does not make
    /// itself (its history, say), the way the chain makes its own: under the source's time
    /// limit and circuit breaker, counted in its statistics (`op` names it in traces). While
    /// the breaker is open it fails at once with [`Error::CircuitOpen`], so that a database
    /// that is down is asked once per cool-down, not once per caller.
    ///
    /// # Errors
    /// `call`'s error, [`Error::Timeout`] past the source's time limit, or
    /// [`Error::CircuitOpen`].
    pub async fn source_call<R>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<R>>,
    ) -> Result<R> {
        self.inner.source.call(op, call).await
    }

    /// The chain's clock.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Publishes the chain's statistics through the `metrics` facade (feature `metrics`):
    /// counters `tiercache_requests_total{tier, outcome}` (outcome `hit`, `found`,
    /// `not_found`, `stale`, `failed`), `tiercache_tier_errors_total{tier}`,
    /// `tiercache_tier_timeouts_total{tier}`, `tiercache_tier_skipped_total{tier}`,
    /// `tiercache_source_loads_total`, `tiercache_coalesced_total`, `tiercache_updates_total`,
    /// `tiercache_remote_invalidations_total`, `tiercache_feed_changes_total`,
    /// `tiercache_feed_flushes_total`; gauges `tiercache_breaker_open{tier}` (0 or 1),
    /// `tiercache_tier_latency_seconds{tier, quantile}`, and for a chain that follows its
    /// source's feed `tiercache_feed_connected`, `tiercache_feed_elected` (0 or 1) and
    /// `tiercache_feed_lag_seconds{quantile}` (from a change's commit to its application).
    /// Call it before each scrape; the histogram `tiercache_tier_call_seconds{tier}` is
    /// recorded on every call as it happens (install the recorder before building the chain).
    ///
    /// Counting stays in the chain's own per-thread counters, so the hot path pays nothing for
    /// metrics.
    #[cfg(feature = "metrics")]
    pub fn export_metrics(&self) {
        let s = self.stats();
        let requests = |tier: &str, outcome: &'static str, n: u64| {
            metrics::counter!("tiercache_requests_total", "tier" => tier.to_owned(), "outcome" => outcome)
                .absolute(n);
        };
        for t in s.tiers.iter().chain(std::iter::once(&s.source)) {
            let tier = t.name.clone();
            metrics::counter!("tiercache_tier_errors_total", "tier" => tier.clone())
                .absolute(t.errors);
            metrics::counter!("tiercache_tier_timeouts_total", "tier" => tier.clone())
                .absolute(t.timeouts);
            metrics::counter!("tiercache_tier_skipped_total", "tier" => tier.clone())
                .absolute(t.skipped);
            metrics::gauge!("tiercache_breaker_open", "tier" => tier.clone())
                .set(if t.breaker_open { 1.0 } else { 0.0 });
            for (quantile, us) in [
                ("0.5", t.latency.p50_us),
                ("0.9", t.latency.p90_us),
                ("0.99", t.latency.p99_us),
            ] {
                metrics::gauge!("tiercache_tier_latency_seconds", "tier" => tier.clone(), "quantile" => quantile)
                    .set(us / 1e6);
            }
        }
        for t in &s.tiers {
            requests(&t.name, "hit", t.hits);
        }
        requests(&s.source.name, "found", s.source.hits);
        requests(&s.source.name, "not_found", s.not_found);
        requests("any", "stale", s.stale_served);
        requests("any", "failed", s.failed);
        metrics::counter!("tiercache_source_loads_total").absolute(s.source_loads);
        metrics::counter!("tiercache_coalesced_total").absolute(s.coalesced);
        metrics::counter!("tiercache_updates_total").absolute(s.updates);
        metrics::counter!("tiercache_remote_invalidations_total").absolute(s.remote_invalidations);
        metrics::counter!("tiercache_feed_changes_total").absolute(s.feed_changes);
        metrics::counter!("tiercache_feed_flushes_total").absolute(s.feed_flushes);
        if let Some(feed) = &s.feed {
            metrics::gauge!("tiercache_feed_connected").set(if feed.connected { 1.0 } else { 0.0 });
            metrics::gauge!("tiercache_feed_elected").set(if feed.elected { 1.0 } else { 0.0 });
            for (quantile, us) in [
                ("0.5", feed.lag.p50_us),
                ("0.9", feed.lag.p90_us),
                ("0.99", feed.lag.p99_us),
                ("1", feed.lag.max_us),
            ] {
                metrics::gauge!("tiercache_feed_lag_seconds", "quantile" => quantile).set(us / 1e6);
            }
        }
    }

    /// Statistics of the chain and of every tier.
    #[must_use]
    pub fn stats(&self) -> ChainStats {
        let inner = &*self.inner;
        let c = &inner.counters;
        let tiers: Vec<ChainTierStats> = inner.tiers.iter().map(Level::stats).collect();
        let mut source = inner.source.stats();
        source.hits = c.source_found.get();
        source.hit_rate = hit_rate(source.hits, source.misses);
        let tier_hits: u64 = tiers.iter().map(|t| t.hits).sum();
        let not_found = c.not_found.get();
        let stale_served = c.stale_served.get();
        let failed = c.failed.get();
        let requests = tier_hits + source.hits + not_found + stale_served + failed;
        ChainStats {
            requests,
            cache_hit_rate: if requests == 0 {
                0.0
            } else {
                tier_hits as f64 / requests as f64
            },
            tiers,
            source,
            not_found,
            stale_served,
            failed,
            source_loads: c.source_loads.get(),
            coalesced: c.coalesced.get(),
            updates: c.updates.get(),
            unchanged_writes: c.unchanged.get(),
            refused_stale_versions: c.refused.get(),
            backplane_errors: c.backplane_errors.get(),
            remote_invalidations: c.remote_invalidations.get(),
            backfills_skipped: c.backfills_skipped.get(),
            feed_changes: c.feed_changes.get(),
            feed_flushes: c.feed_flushes.get(),
            loads_in_flight: inner.flights.len() as u64,
            load_callers: inner.flights.callers() as u64,
            background_tasks: inner.tasks.running() as u64,
            floors: inner.floors.len() as u64,
            feed: inner
                .feed_health
                .get()
                .map(|(connected, elected)| crate::stats::FeedStats {
                    connected,
                    elected,
                    lag: inner.feed_lag.summary(),
                }),
        }
    }
}
