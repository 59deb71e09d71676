//! [`TieredCacheBuilder`]: tiers, source, clock, backplane and policy knobs.

use std::sync::Arc;
use std::time::Duration;

use super::floors::Floors;
use super::level::Level;
use super::marks::Marks;
use super::repairs::DEFAULT_MAX_PENDING_REPAIRS;
use super::{
    ChainCounters, DEFAULT_FLOOR_TTL, DEFAULT_MAX_STALE, DEFAULT_NEGATIVE_TTL,
    DEFAULT_SOURCE_TIMEOUT, DEFAULT_TIER_TIMEOUT, DEFAULT_WRITE_SETTLE, Inner, Policy, TieredCache,
};
use crate::backplane::Backplane;
use crate::breaker::BreakerPolicy;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::source::Source;
use crate::tier::{CacheTier, Key, Value};

/// A tier and the time limit of each call to it.
type TierAndLimit<K, V> = (Arc<dyn CacheTier<K, V>>, Option<Duration>);
/// The source and the time limit of each call to it.
type SourceAndLimit<K, V> = (Arc<dyn Source<K, V>>, Option<Duration>);

/// Builds a [`TieredCache`]; see [`TieredCache::builder`].
///
/// ```
/// use std::time::Duration;
/// use tiercache_testkit::FakeSource;
/// use tiercache_core::TieredCache;
///
/// let cache: TieredCache<String, String> = TieredCache::builder()
///     .source_with_timeout(FakeSource::new("db"), Some(Duration::from_secs(2)))
///     .negative_ttl(Some(Duration::from_secs(30)))
///     .max_stale(Some(Duration::from_secs(600)))
///     .build()
///     .unwrap();
/// ```
#[must_use]
pub struct TieredCacheBuilder<K, V> {
    tiers: Vec<TierAndLimit<K, V>>,
    source: Option<SourceAndLimit<K, V>>,
    backplane: Option<Arc<dyn Backplane<K, V>>>,
    clock: Clock,
    policy: Policy,
    follow: bool,
}

impl<K: Key, V: Value> Default for TieredCacheBuilder<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Key, V: Value> TieredCacheBuilder<K, V> {
    /// An empty builder with the default policy.
    pub fn new() -> Self {
        TieredCacheBuilder {
            tiers: Vec::new(),
            source: None,
            backplane: None,
            follow: true,
            clock: Clock::system(),
            policy: Policy {
                breaker: BreakerPolicy::default(),
                background_backfill: false,
                single_flight: true,
                negative_ttl: Some(DEFAULT_NEGATIVE_TTL),
                max_stale: Some(DEFAULT_MAX_STALE),
                floor_ttl: DEFAULT_FLOOR_TTL,
                write_settle: DEFAULT_WRITE_SETTLE,
                max_pending_repairs: DEFAULT_MAX_PENDING_REPAIRS,
                fill_grace: Duration::ZERO,
            },
        }
    }

    /// Adds a cache tier below those already added, with a time limit of
    /// [`DEFAULT_TIER_TIMEOUT`] per call.
    pub fn tier(self, tier: impl CacheTier<K, V> + 'static) -> Self {
        self.shared_tier(Arc::new(tier), Some(DEFAULT_TIER_TIMEOUT))
    }

    /// Adds a cache tier with its own time limit per call (`None`: no limit).
    pub fn tier_with_timeout(
        self,
        tier: impl CacheTier<K, V> + 'static,
        timeout: Option<Duration>,
    ) -> Self {
        self.shared_tier(Arc::new(tier), timeout)
    }

    /// Adds a cache tier you keep a handle to (for example to read its stats or clear it).
    pub fn shared_tier(
        mut self,
        tier: Arc<dyn CacheTier<K, V>>,
        timeout: Option<Duration>,
    ) -> Self {
        self.tiers.push((tier, timeout));
        self
    }

    /// Sets the authoritative source, with a time limit of [`DEFAULT_SOURCE_TIMEOUT`] per call.
    pub fn source(self, source: impl Source<K, V> + 'static) -> Self {
        self.shared_source(Arc::new(source), Some(DEFAULT_SOURCE_TIMEOUT))
    }

    /// Sets the authoritative source with its own time limit per call (`None`: no limit).
    pub fn source_with_timeout(
        self,
        source: impl Source<K, V> + 'static,
        timeout: Option<Duration>,
    ) -> Self {
        self.shared_source(Arc::new(source), timeout)
    }

    /// Sets a source you keep a handle to.
    pub fn shared_source(
        mut self,
        source: Arc<dyn Source<K, V>>,
        timeout: Option<Duration>,
    ) -> Self {
        self.source = Some((source, timeout));
        self
    }

    /// The clock for negative-entry expiry and version floors. Give the same clock to the tiers.
    /// Defaults to [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Publishes every update and invalidation to the other instances through `backplane`.
    /// Apply theirs with [`TieredCache::apply`] (see [`Backplane`]).
    pub fn backplane(mut self, backplane: Arc<dyn Backplane<K, V>>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// Back-fills the tiers below the top one in a background task, after the caller has its
    /// answer, so that a miss does not also wait for a Redis write. The top tier is always
    /// filled first, inline. Defaults to `false` (every back-fill done before `get` returns).
    pub fn background_backfill(mut self, on: bool) -> Self {
        self.policy.background_backfill = on;
        self
    }

    /// Whether concurrent misses of one key share one load (single-flight). Turning it off
    /// exists to measure what it saves (the seed design had none). Defaults to `true`.
    pub fn single_flight(mut self, on: bool) -> Self {
        self.policy.single_flight = on;
        self
    }

    /// When each level's circuit breaker opens (consecutive transient failures) and how long it
    /// skips the tier before probing it. Defaults to [`BreakerPolicy::default`]: 3 failures,
    /// 250 ms.
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.policy.breaker = policy;
        self
    }

    /// Time to live of a cached "not found" (`None`: do not cache it). Defaults to
    /// [`DEFAULT_NEGATIVE_TTL`].
    pub fn negative_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.policy.negative_ttl = ttl;
        self
    }

    /// Oldest stale copy served when the source fails (`None`: never serve stale). Defaults to
    /// [`DEFAULT_MAX_STALE`].
    pub fn max_stale(mut self, age: Option<Duration>) -> Self {
        self.policy.max_stale = age;
        self
    }

    /// How long this chain refuses versions older than one it wrote, after a write that could
    /// not reach every cache tier (plus the max-stale age, for stale copies). Set it to at least
    /// the longest cache tier TTL. Defaults to [`DEFAULT_FLOOR_TTL`], the default Redis TTL.
    pub fn floor_ttl(mut self, ttl: Duration) -> Self {
        self.policy.floor_ttl = ttl;
        self
    }

    /// How long a write whose outcome is unknown (it timed out or lost its connection, so the
    /// source may still commit it) can take to commit after the chain gave up on it: the key
    /// is invalidated everywhere at once, and again, at the source's version, after this long.
    /// Set it to the longest a write can run inside the source (its own statement or lock
    /// timeouts). Defaults to [`DEFAULT_WRITE_SETTLE`].
    pub fn write_settle(mut self, settle: Duration) -> Self {
        self.policy.write_settle = settle;
        self
    }

    /// Most keys whose invalidation a cache tier may miss (it was down) before the chain gives
    /// up replaying them one by one and clears the tier instead; until the clear succeeds no
    /// read uses the tier. Defaults to [`DEFAULT_MAX_PENDING_REPAIRS`].
    pub fn max_pending_repairs(mut self, max: usize) -> Self {
        self.policy.max_pending_repairs = max;
        self
    }

    /// Whether the chain follows its source's change feed ([`Source::follow`]): every change
    /// the source commits, by any writer, is applied to the cache tiers as it commits.
    /// Defaults to `true`; a source without a feed is not followed either way.
    pub fn follow_changes(mut self, on: bool) -> Self {
        self.follow = on;
        self
    }

    /// Builds the chain (and starts following the source's feed, if it has one).
    ///
    /// # Errors
    /// [`Error::Config`] without a source, or with a zero time limit or TTL; with a source
    /// that has a feed, outside a Tokio runtime.
    pub fn build(self) -> Result<TieredCache<K, V>> {
        let (source, source_timeout) = self
            .source
            .ok_or_else(|| Error::Config("a chain needs a source (call .source(...))".into()))?;
        let zero = |d: Option<Duration>| d.is_some_and(|d| d.is_zero());
        if zero(source_timeout) || self.tiers.iter().any(|(_, t)| zero(*t)) {
            return Err(Error::Config(
                "a time limit of zero fails every call; use None for no limit".into(),
            ));
        }
        if zero(self.policy.negative_ttl) {
            return Err(Error::Config(
                "negative_ttl of zero caches nothing; use None to disable negative caching".into(),
            ));
        }
        if self.policy.floor_ttl.is_zero() {
            return Err(Error::Config("floor_ttl must be positive".into()));
        }
        if self.policy.max_pending_repairs == 0 {
            return Err(Error::Config(
                "max_pending_repairs must be at least 1".into(),
            ));
        }
        let max_repairs = self.policy.max_pending_repairs;
        let mut policy = self.policy;
        policy.fill_grace = self
            .tiers
            .iter()
            .filter_map(|(_, t)| *t)
            .max()
            .unwrap_or_default();
        let feed = if self.follow { source.follow() } else { None };
        if feed.is_some() && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "a chain that follows its source's changes is built inside a Tokio runtime".into(),
            ));
        }
        let (stop, stopped) = match feed {
            Some(_) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let chain = TieredCache {
            inner: Arc::new(Inner {
                tiers: self
                    .tiers
                    .into_iter()
                    .map(|(tier, timeout)| Level::new(tier, timeout, policy.breaker, max_repairs))
                    .collect(),
                source: Level::new(source, source_timeout, policy.breaker, max_repairs),
                clock: self.clock,
                policy,
                flights: Flights::new(),
                floors: Floors::new(),
                backplane: self.backplane,
                marks: Marks::new(),
                tasks: Arc::default(),
                counters: ChainCounters::default(),
                feed_health: super::feed::Health::default(),
                feed_lag: crate::latency::LatencyHistogram::default(),
                observers: super::observe::Observers::default(),
                _feed_stop: stop,
            }),
        };
        if let (Some(feed), Some(stopped)) = (feed, stopped) {
            chain.inner.feed_health.starting();
            super::feed::follow(chain.downgrade(), feed, stopped);
        }
        Ok(chain)
    }
}
