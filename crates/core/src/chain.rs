//! [`TieredCache`]: the chain of cache tiers over an authoritative source.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::backplane::Backplane;
use crate::breaker::{Breaker, BreakerPolicy, Permit};
use crate::clock::{Clock, Timestamp};
use crate::entry::{Entry, Version};
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::latency::LatencyHistogram;
use crate::stats::{ChainStats, ChainTierStats, Counter, hit_rate};
use crate::tier::{CacheTier, Key, Peek, Value};

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

/// One level of the chain: a tier, its time limit and the chain's counters for it.
struct Level<K, V> {
    tier: Arc<dyn CacheTier<K, V>>,
    name: String,
    timeout: Option<Duration>,
    breaker: Breaker,
    /// Invalidations this tier missed (it was down or skipped), replayed before it is read
    /// again: key → the version to invalidate at (`None`: a manual invalidation).
    repairs: Mutex<HashMap<K, Option<Version>>>,
    repairs_len: AtomicUsize,
    hits: Counter,
    misses: Counter,
    errors: Counter,
    timeouts: Counter,
    skipped: Counter,
    latency: LatencyHistogram,
    #[cfg(feature = "metrics")]
    call_seconds: metrics::Histogram,
}

impl<K: Key, V: Value> Level<K, V> {
    fn new(
        tier: Arc<dyn CacheTier<K, V>>,
        timeout: Option<Duration>,
        breaker: BreakerPolicy,
    ) -> Self {
        let name = tier.name().to_owned();
        Level {
            #[cfg(feature = "metrics")]
            call_seconds: metrics::histogram!("tiercache_tier_call_seconds", "tier" => name.clone()),
            name,
            tier,
            timeout,
            breaker: Breaker::new(breaker),
            repairs: Mutex::new(HashMap::new()),
            repairs_len: AtomicUsize::new(0),
            hits: Counter::default(),
            misses: Counter::default(),
            errors: Counter::default(),
            timeouts: Counter::default(),
            skipped: Counter::default(),
            latency: LatencyHistogram::default(),
        }
    }

    /// Remembers that this tier missed an invalidation of `key` at `version`.
    fn remember(&self, key: &K, version: Option<Version>) {
        let mut repairs = self.repairs.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = repairs.entry(key.clone()).or_insert(version);
        *slot = match (*slot, version) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        self.repairs_len.store(repairs.len(), Ordering::Release);
    }

    /// Replays the invalidations this tier missed. On a failure the rest stay for next time
    /// and the tier must not be read now.
    async fn repair(&self) -> Result<()> {
        if self.repairs_len.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let pending: Vec<(K, Option<Version>)> = {
            let mut repairs = self.repairs.lock().unwrap_or_else(PoisonError::into_inner);
            self.repairs_len.store(0, Ordering::Release);
            repairs.drain().collect()
        };
        let mut pending = pending.into_iter();
        while let Some((key, version)) = pending.next() {
            if let Err(error) = self
                .call("invalidate", self.tier.invalidate(&key, version))
                .await
            {
                self.remember(&key, version);
                for (key, version) in pending {
                    self.remember(&key, version);
                }
                return Err(error);
            }
        }
        tracing::debug!(tier = %self.name, "missed invalidations replayed");
        Ok(())
    }

    /// Runs one call to the tier under its time limit and its breaker; counts and traces a
    /// failure. While the breaker is open the call is skipped with [`Error::CircuitOpen`].
    async fn call<T>(&self, op: &'static str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let permit = self.breaker.permit();
        if permit == Permit::Skip {
            self.skipped.incr();
            return Err(Error::CircuitOpen {
                tier: self.name.clone(),
            });
        }
        let started = std::time::Instant::now();
        let result = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    tier: self.name.clone(),
                    after: limit,
                }),
            },
            None => fut.await,
        };
        let took = started.elapsed();
        self.latency.record(took);
        #[cfg(feature = "metrics")]
        self.call_seconds.record(took.as_secs_f64());
        self.breaker.record(
            permit,
            result.as_ref().err().is_none_or(|e| !e.is_transient()),
        );
        if let Err(error) = &result {
            self.errors.incr();
            if error.is_timeout() {
                self.timeouts.incr();
            }
            tracing::debug!(tier = %self.name, op, %error, "tier call failed");
        }
        result
    }

    fn stats(&self) -> ChainTierStats {
        let (hits, misses) = (self.hits.get(), self.misses.get());
        ChainTierStats {
            name: self.name.clone(),
            hits,
            misses,
            errors: self.errors.get(),
            timeouts: self.timeouts.get(),
            skipped: self.skipped.get(),
            breaker_open: self.breaker.is_open(),
            breaker_opened: self.breaker.opened.get(),
            pending_repairs: self.repairs_len.load(Ordering::Relaxed) as u64,
            latency: self.latency.summary(),
            hit_rate: hit_rate(hits, misses),
            tier: self.tier.stats(),
        }
    }
}

/// Versions this chain wrote that some cache tier may not have seen (its invalidation failed).
/// Until a floor dies, an older version of its key is treated as a miss at every tier.
struct Floors<K> {
    map: Mutex<HashMap<K, (Version, Timestamp)>>,
    len: AtomicUsize,
}

impl<K: Key> Floors<K> {
    fn new() -> Self {
        Floors {
            map: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
        }
    }

    /// Whether `version` of `key` may be served now.
    #[inline(always)]
    fn allows(&self, key: &K, version: Version, clock: &Clock) -> bool {
        // The common case, no failed writes outstanding, is one relaxed load.
        self.len.load(Ordering::Relaxed) == 0 || self.check(key, version, clock)
    }

    #[cold]
    fn check(&self, key: &K, version: Version, clock: &Clock) -> bool {
        let now = clock.now();
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(key) {
            Some(&(floor, until)) if now < until => version >= floor,
            _ => true,
        }
    }

    fn raise(&self, key: &K, version: Version, now: Timestamp, ttl: Duration) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, &mut (_, until)| now < until);
        let slot = map.entry(key.clone()).or_insert((version, now + ttl));
        if version >= slot.0 {
            *slot = (version, now + ttl);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }
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
    refused: Counter,
    backplane_errors: Counter,
    remote_invalidations: Counter,
}

struct Inner<K, V> {
    tiers: Vec<Level<K, V>>,
    source: Level<K, V>,
    clock: Clock,
    policy: Policy,
    flights: Flights<K, Result<Fetched<V>>>,
    floors: Floors<K>,
    backplane: Option<Arc<dyn Backplane<K, V>>>,
    /// Bumped by every manual invalidation and clear. A load that sees it change skips its
    /// back-fill, so that it cannot put back what was just invalidated.
    epoch: AtomicU64,
    counters: ChainCounters,
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
///   touched), then every cache tier is invalidated at the previous version and repopulated
///   with the new one. Tombstones and version checks in the tiers keep a slow reader from
///   back-filling an older value afterwards.
///
/// Cheap to clone; clones share everything.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::TieredCache;
/// use tiercache_testkit::FakeTier;
///
/// let source = FakeTier::source("db"); // your database tier
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

    /// The value for `key`: `Ok(None)` if the source does not have it.
    ///
    /// A hit in a top tier with a synchronous path ([`CacheTier::peek`]) completes without
    /// awaiting anything.
    #[inline]
    pub async fn get(&self, key: &K) -> Result<Option<Arc<V>>> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(entry.value),
            // Boxed, so that the future of a hit stays a few words: it is built and moved on
            // every call, the slow path's state machine is most of a kilobyte.
            Top::Continue(start) => Box::pin(self.fetch_slow(key, start)).await.map(|f| f.value),
        }
    }

    /// Like [`get`](TieredCache::get), with the version and the level that answered.
    pub async fn fetch(&self, key: &K) -> Result<Fetched<V>> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(Fetched::from_entry(entry, Origin::Tier(0))),
            Top::Continue(start) => Box::pin(self.fetch_slow(key, start)).await,
        }
    }

    /// The synchronous half of [`fetch`](TieredCache::fetch): the top tier's answer, if it
    /// has one without I/O, else a [`Miss`] to hand to [`fetch_after`](TieredCache::fetch_after)
    /// (the miss is already counted; do not call `fetch` for the same request).
    ///
    /// For callers that look keys up by a borrowed form: build the key in a reused buffer for
    /// `peek`, and own it only on a miss.
    #[inline]
    pub fn peek(&self, key: &K) -> Result<Fetched<V>, Miss> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(Fetched::from_entry(entry, Origin::Tier(0))),
            Top::Continue(start) => Err(Miss { start }),
        }
    }

    /// The asynchronous half of [`fetch`](TieredCache::fetch), after [`peek`](TieredCache::peek)
    /// missed.
    pub async fn fetch_after(&self, key: &K, miss: Miss) -> Result<Fetched<V>> {
        Box::pin(self.fetch_slow(key, miss.start)).await
    }

    /// Asks the top tier's synchronous path, and counts its answer.
    #[inline(always)]
    fn peek_top(&self, key: &K) -> Top<V> {
        let inner = &*self.inner;
        let Some(top) = inner.tiers.first() else {
            return Top::Continue(0);
        };
        match top.tier.peek(key) {
            Peek::Hit(entry) if inner.floors.allows(key, entry.version, &inner.clock) => {
                top.hits.incr();
                Top::Hit(entry)
            }
            Peek::Hit(_) => {
                inner.counters.refused.incr();
                top.misses.incr();
                Top::Continue(1)
            }
            Peek::Miss => {
                top.misses.incr();
                Top::Continue(1)
            }
            Peek::Unsupported => Top::Continue(0),
        }
    }

    /// Everything after the top tier's synchronous path, from cache tier `start` down,
    /// coalesced per key.
    /// Every request that gets here runs in a `tiercache.get` span recording the tier that
    /// answered, the outcome and the version. (Hits in the top tier's synchronous path get no
    /// span: it would cost a quarter of the hit; they are counted in the stats and metrics.)
    async fn fetch_slow(&self, key: &K, start: usize) -> Result<Fetched<V>> {
        use tracing::Instrument;
        let inner = &*self.inner;
        let span = tracing::debug_span!(
            "tiercache.get",
            answered_by = tracing::field::Empty,
            outcome = tracing::field::Empty,
            version = tracing::field::Empty,
            coalesced = tracing::field::Empty,
        );
        let (result, led) = if inner.policy.single_flight {
            inner
                .flights
                .run(key, || self.load(key, start))
                .instrument(span.clone())
                .await
        } else {
            (self.load(key, start).instrument(span.clone()).await, true)
        };
        if !led {
            inner.counters.coalesced.incr();
        }
        span.record("coalesced", !led);
        match &result {
            Ok(f) => {
                let (tier, outcome) = match f.origin {
                    Origin::Tier(i) => (inner.tiers[i].name.as_str(), "hit"),
                    Origin::Source if f.is_found() => (inner.source.name.as_str(), "found"),
                    Origin::Source => (inner.source.name.as_str(), "not_found"),
                    Origin::Stale(i) => (inner.tiers[i].name.as_str(), "stale"),
                };
                span.record("answered_by", tier);
                span.record("outcome", outcome);
                span.record("version", f.version);
            }
            Err(_) => {
                span.record("outcome", "error");
            }
        }
        self.count(&result);
        result
    }

    /// Counts a slow-path request's outcome (the fast path counts its own hits).
    fn count(&self, result: &Result<Fetched<V>>) {
        let c = &self.inner.counters;
        match result {
            Ok(f) => match f.origin {
                Origin::Tier(i) => self.inner.tiers[i].hits.incr(),
                Origin::Source if f.is_found() => c.source_found.incr(),
                Origin::Source => c.not_found.incr(),
                Origin::Stale(_) => c.stale_served.incr(),
            },
            Err(_) => c.failed.incr(),
        }
    }

    /// The miss path, run once per key however many callers wait for it.
    async fn load(&self, key: &K, start: usize) -> Result<Fetched<V>> {
        let inner = &*self.inner;
        let epoch = inner.epoch.load(Ordering::SeqCst);
        for (i, level) in inner.tiers.iter().enumerate().skip(start) {
            if level.repair().await.is_err() {
                continue;
            }
            match level.call("get", level.tier.get(key)).await {
                Ok(Some(entry)) if inner.floors.allows(key, entry.version, &inner.clock) => {
                    tracing::trace!(tier = %level.name, "hit");
                    self.backfill(key, &entry, i, epoch).await;
                    return Ok(Fetched::from_entry(entry, Origin::Tier(i)));
                }
                Ok(Some(_)) => {
                    inner.counters.refused.incr();
                    level.misses.incr();
                }
                Ok(None) => level.misses.incr(),
                Err(_) => {}
            }
        }
        let source = &inner.source;
        inner.counters.source_loads.incr();
        match source.call("get", source.tier.get(key)).await {
            Ok(Some(entry)) => {
                // The source's entries do not expire; each tier applies its own TTL.
                let entry = Entry {
                    expires_at: None,
                    ..entry
                };
                self.backfill(key, &entry, inner.tiers.len(), epoch).await;
                Ok(Fetched::from_entry(entry, Origin::Source))
            }
            Ok(None) => {
                source.misses.incr();
                if let Some(ttl) = inner.policy.negative_ttl {
                    let absent = Entry::absent(0).expiring_at(inner.clock.now() + ttl);
                    self.backfill(key, &absent, inner.tiers.len(), epoch).await;
                }
                Ok(Fetched::from_entry(Entry::absent(0), Origin::Source))
            }
            Err(error) => self.fail_safe(key, error).await,
        }
    }

    /// The source failed. If the failure is transient (unreachable, slow), serve a stale copy
    /// within the max-stale age, if any, else [`Error::SourceUnavailable`]. Other failures (a
    /// row that does not decode, a refused query) are returned as they are: they say something
    /// about the data, not about availability.
    async fn fail_safe(&self, key: &K, error: Error) -> Result<Fetched<V>> {
        let inner = &*self.inner;
        if !error.is_transient() {
            tracing::warn!(%error, "source failed");
            return Err(error);
        }
        if let Some(max_stale) = inner.policy.max_stale {
            for (i, level) in inner.tiers.iter().enumerate() {
                if let Ok(Some(entry)) = level
                    .call("get_stale", level.tier.get_stale(key, max_stale))
                    .await
                {
                    if inner.floors.allows(key, entry.version, &inner.clock) {
                        tracing::debug!(tier = %level.name, %error, "source failed; serving stale copy");
                        return Ok(Fetched::from_entry(entry, Origin::Stale(i)));
                    }
                }
            }
        }
        tracing::warn!(%error, "source failed and no usable cached copy");
        Err(Error::SourceUnavailable {
            source: Box::new(error),
        })
    }

    /// Stores `entry` in cache tiers `0..below`, unless a manual invalidation or clear happened
    /// since the load began at `epoch`. Failures are counted and skipped.
    ///
    /// `invalidate` bumps the epoch before it touches a tier, so a set that lands after the
    /// tier was invalidated is seen by the check that follows it, and taken back.
    async fn backfill(&self, key: &K, entry: &Entry<V>, below: usize, epoch: u64) {
        self.backfill_with(
            key,
            entry,
            below,
            epoch,
            self.inner.policy.background_backfill,
        )
        .await;
    }

    async fn backfill_with(
        &self,
        key: &K,
        entry: &Entry<V>,
        below: usize,
        epoch: u64,
        background: bool,
    ) {
        if below == 0 {
            return;
        }
        // The top tier (in-process, cheap) is always filled before the caller gets its answer.
        self.backfill_range(key, entry, 0..1, epoch).await;
        if below > 1 {
            if background {
                let (this, key, entry) = (self.clone(), key.clone(), entry.clone());
                tokio::spawn(async move {
                    this.backfill_range(&key, &entry, 1..below, epoch).await;
                });
            } else {
                self.backfill_range(key, entry, 1..below, epoch).await;
            }
        }
    }

    async fn backfill_range(
        &self,
        key: &K,
        entry: &Entry<V>,
        levels: std::ops::Range<usize>,
        epoch: u64,
    ) {
        let current = || self.inner.epoch.load(Ordering::SeqCst) == epoch;
        for level in &self.inner.tiers[levels] {
            if !current() {
                tracing::trace!("invalidated during the load; back-fill skipped");
                return;
            }
            let stored = level.call("set", level.tier.set(key, entry.clone())).await;
            if matches!(stored, Ok(true)) && !current() {
                let _ = level
                    .call("invalidate", level.tier.invalidate(key, None))
                    .await;
                return;
            }
        }
    }

    /// Loads `keys` into the cache tiers ahead of demand, `batch` keys per
    /// [`get_many`](TieredCache::get_many) (one batch call per tier), every tier filled before
    /// it returns. Returns how many keys the source had.
    ///
    /// # Errors
    /// The first batch that fails; the batches before it stay loaded.
    pub async fn warm(&self, keys: &[K], batch: usize) -> Result<usize> {
        let mut found = 0;
        for chunk in keys.chunks(batch.max(1)) {
            found += self
                .get_many_with(chunk, false)
                .await?
                .iter()
                .filter(|v| v.is_some())
                .count();
        }
        Ok(found)
    }

    /// The values for `keys`, in order, answered tier by tier with one batch call per tier
    /// ([`CacheTier::get_many`]). Batches are not coalesced with concurrent single gets.
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Arc<V>>>> {
        self.get_many_with(keys, self.inner.policy.background_backfill)
            .await
    }

    async fn get_many_with(&self, keys: &[K], background: bool) -> Result<Vec<Option<Arc<V>>>> {
        let inner = &*self.inner;
        let epoch = inner.epoch.load(Ordering::SeqCst);
        let mut answers: Vec<Option<Fetched<V>>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        for (i, level) in inner.tiers.iter().enumerate() {
            if pending.is_empty() {
                break;
            }
            if level.repair().await.is_err() {
                continue;
            }
            let batch: Vec<K> = pending.iter().map(|&p| keys[p].clone()).collect();
            let Ok(found) = level.call("get_many", level.tier.get_many(&batch)).await else {
                continue;
            };
            let mut still = Vec::with_capacity(pending.len());
            for (&p, entry) in pending.iter().zip(found) {
                match entry {
                    Some(e) if inner.floors.allows(&keys[p], e.version, &inner.clock) => {
                        level.hits.incr();
                        self.backfill_with(&keys[p], &e, i, epoch, background).await;
                        answers[p] = Some(Fetched::from_entry(e, Origin::Tier(i)));
                    }
                    _ => {
                        level.misses.incr();
                        still.push(p);
                    }
                }
            }
            pending = still;
        }
        if !pending.is_empty() {
            let source = &inner.source;
            let batch: Vec<K> = pending.iter().map(|&p| keys[p].clone()).collect();
            inner.counters.source_loads.incr();
            match source.call("get_many", source.tier.get_many(&batch)).await {
                Ok(found) => {
                    let negative = inner
                        .policy
                        .negative_ttl
                        .map(|ttl| Entry::absent(0).expiring_at(inner.clock.now() + ttl));
                    for (&p, entry) in pending.iter().zip(found) {
                        let below = inner.tiers.len();
                        match entry {
                            Some(e) => {
                                let e = Entry {
                                    expires_at: None,
                                    ..e
                                };
                                inner.counters.source_found.incr();
                                self.backfill_with(&keys[p], &e, below, epoch, background)
                                    .await;
                                answers[p] = Some(Fetched::from_entry(e, Origin::Source));
                            }
                            None => {
                                source.misses.incr();
                                inner.counters.not_found.incr();
                                if let Some(absent) = &negative {
                                    self.backfill_with(&keys[p], absent, below, epoch, background)
                                        .await;
                                }
                                answers[p] =
                                    Some(Fetched::from_entry(Entry::absent(0), Origin::Source));
                            }
                        }
                    }
                }
                Err(error) => {
                    for &p in &pending {
                        let result = self.fail_safe(&keys[p], error.clone()).await;
                        self.count(&result);
                        answers[p] = Some(result?);
                    }
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.and_then(|f| f.value))
            .collect())
    }

    /// Writes `value` to the source, then invalidates every cache tier at the previous version
    /// and repopulates it with the new one. Returns the new version.
    ///
    /// If the source write fails, the error is returned and no cache is touched. A cache tier
    /// that fails here is counted and skipped; until the floor TTL passes, this chain then
    /// refuses to serve versions older than the one written, from any tier.
    pub async fn update(&self, key: &K, value: Arc<V>) -> Result<Version> {
        use tracing::Instrument;
        let span = tracing::debug_span!("tiercache.update", version = tracing::field::Empty);
        let result = self.update_inner(key, value).instrument(span.clone()).await;
        if let Ok(version) = &result {
            span.record("version", version);
        }
        result
    }

    async fn update_inner(&self, key: &K, value: Arc<V>) -> Result<Version> {
        let inner = &*self.inner;
        let version = inner
            .source
            .call("write", inner.source.tier.write(key, Arc::clone(&value)))
            .await?;
        inner.counters.updates.incr();
        // No request that starts after this returns may join a load that began before it.
        inner.flights.forget(key);
        let entry = Entry::new(Arc::clone(&value), version);
        let previous = version.checked_sub(1);
        let mut missed = vec![false; inner.tiers.len()];
        for (i, level) in inner.tiers.iter().enumerate().rev() {
            missed[i] = level.repair().await.is_err();
            if let (Some(previous), false) = (previous, missed[i]) {
                missed[i] = level
                    .call("invalidate", level.tier.invalidate(key, Some(previous)))
                    .await
                    .is_err();
            }
        }
        for (i, level) in inner.tiers.iter().enumerate().rev() {
            let stored = level.call("set", level.tier.set(key, entry.clone())).await;
            // A tier whose invalidation failed but whose set succeeded holds the new version;
            // one whose invalidation succeeded holds at worst a tombstone against older ones.
            missed[i] &= stored.is_err();
        }
        if missed.iter().any(|m| *m) {
            tracing::warn!(
                version,
                "update could not reach every cache tier; raising a floor"
            );
            for (level, _) in inner.tiers.iter().zip(&missed).filter(|(_, m)| **m) {
                level.remember(key, previous);
            }
            // A stale copy may be served up to max-stale past its expiry: outlive that too.
            let life = inner.policy.floor_ttl + inner.policy.max_stale.unwrap_or(Duration::ZERO);
            inner.floors.raise(key, version, inner.clock.now(), life);
        }
        self.publish(key, Some(version), Some(value)).await;
        Ok(version)
    }

    /// Removes `key` from every cache tier, for a change made behind the chain's back (writes
    /// through [`update`](TieredCache::update) need no invalidation). Loads already running in
    /// this chain skip their back-fill; the next read asks the source. A tier that cannot be
    /// reached gets the invalidation replayed before it is read again. Every tier is tried; the
    /// first failure is returned.
    pub async fn invalidate(&self, key: &K) -> Result<()> {
        use tracing::Instrument;
        self.invalidate_inner(key)
            .instrument(tracing::debug_span!("tiercache.invalidate"))
            .await
    }

    async fn invalidate_inner(&self, key: &K) -> Result<()> {
        let inner = &*self.inner;
        inner.epoch.fetch_add(1, Ordering::SeqCst);
        inner.flights.forget(key);
        let mut first_error = None;
        for level in &inner.tiers {
            let result = match level.repair().await {
                Ok(()) => {
                    level
                        .call("invalidate", level.tier.invalidate(key, None))
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                level.remember(key, None);
                first_error.get_or_insert(e);
            }
        }
        self.publish(key, None, None).await;
        first_error.map_or(Ok(()), Err)
    }

    async fn publish(&self, key: &K, version: Option<Version>, value: Option<Arc<V>>) {
        if let Some(backplane) = &self.inner.backplane {
            if let Err(error) = backplane.publish(key, version, value).await {
                self.inner.counters.backplane_errors.incr();
                tracing::warn!(%error, "could not publish an invalidation");
            }
        }
    }

    /// Applies another instance's update or invalidation (from a [`Backplane`]) to the top
    /// tier. With a `value` (the value at `version`) and a copy of `key` held, the copy is
    /// replaced by the new version, so that a hot key stays hot; otherwise copies older than
    /// `version` are dropped and refused afterwards (`None`: whatever is held is dropped, and
    /// loads running now skip their back-fill). The tier's version rules make a late message
    /// harmless: it never replaces or evicts a newer entry.
    pub async fn apply_remote_invalidation(
        &self,
        key: &K,
        version: Option<Version>,
        value: Option<Arc<V>>,
    ) {
        let inner = &*self.inner;
        inner.counters.remote_invalidations.incr();
        if version.is_none() {
            inner.epoch.fetch_add(1, Ordering::SeqCst);
        }
        inner.flights.forget(key);
        let Some(top) = inner.tiers.first() else {
            return;
        };
        if let (Some(version), Some(value)) = (version, value) {
            let held = matches!(
                top.tier.get_stale(key, Duration::MAX).await,
                Ok(Some(entry)) if entry.version < version
            );
            if held {
                let _ = top
                    .call("set", top.tier.set(key, Entry::new(value, version)))
                    .await;
                return;
            }
        }
        let below = version.map(|v| v.saturating_sub(1));
        let _ = top
            .call("invalidate", top.tier.invalidate(key, below))
            .await;
    }

    /// Replays the invalidations cache tiers missed while they were unreachable (each tier's
    /// are replayed anyway before it is next read; call this periodically so that other
    /// instances sharing the tier never read what this one could not invalidate). Returns the
    /// first failure; what failed stays for next time.
    pub async fn repair(&self) -> Result<()> {
        let mut first_error = None;
        for level in &self.inner.tiers {
            if let Err(e) = level.repair().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Empties the top (in-process) tier, for when this instance may have missed invalidations
    /// (its backplane subscription dropped). Loads running now skip their back-fill.
    pub async fn flush_local(&self) {
        let inner = &*self.inner;
        inner.epoch.fetch_add(1, Ordering::SeqCst);
        if let Some(top) = inner.tiers.first() {
            let _ = top.call("clear", top.tier.clear()).await;
        }
        tracing::info!("top tier flushed: invalidations may have been missed");
    }

    /// Empties every cache tier (never the source). Every tier is tried; the first failure is
    /// returned.
    pub async fn clear(&self) -> Result<()> {
        let mut first_error = None;
        for i in 0..self.inner.tiers.len() {
            if let Err(e) = self.clear_tier(i).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Empties cache tier `index` (0 is the top).
    pub async fn clear_tier(&self, index: usize) -> Result<()> {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
        let level = self.inner.tiers.get(index).ok_or_else(|| {
            Error::InvalidInput(format!(
                "no cache tier {index}; the chain has {}",
                self.inner.tiers.len()
            ))
        })?;
        level.call("clear", level.tier.clear()).await
    }

    /// The cache tiers, top first.
    pub fn tiers(&self) -> impl ExactSizeIterator<Item = &Arc<dyn CacheTier<K, V>>> {
        self.inner.tiers.iter().map(|l| &l.tier)
    }

    /// The authoritative source.
    #[must_use]
    pub fn source(&self) -> &Arc<dyn CacheTier<K, V>> {
        &self.inner.source.tier
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
    /// `tiercache_remote_invalidations_total`; gauges `tiercache_breaker_open{tier}` (0 or 1)
    /// and `tiercache_tier_latency_seconds{tier, quantile}`. Call it before each scrape; the
    /// histogram `tiercache_tier_call_seconds{tier}` is recorded on every call as it happens
    /// (install the recorder before building the chain).
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
            refused_stale_versions: c.refused.get(),
            backplane_errors: c.backplane_errors.get(),
            remote_invalidations: c.remote_invalidations.get(),
        }
    }
}

/// A tier and the time limit of each call to it.
type TierAndLimit<K, V> = (Arc<dyn CacheTier<K, V>>, Option<Duration>);

/// Builds a [`TieredCache`]; see [`TieredCache::builder`].
///
/// ```
/// use std::time::Duration;
/// use tiercache_testkit::FakeTier;
/// use tiercache_core::TieredCache;
///
/// let cache: TieredCache<String, String> = TieredCache::builder()
///     .source_with_timeout(FakeTier::source("db"), Some(Duration::from_secs(2)))
///     .negative_ttl(Some(Duration::from_secs(30)))
///     .max_stale(Some(Duration::from_secs(600)))
///     .build()
///     .unwrap();
/// ```
#[must_use]
pub struct TieredCacheBuilder<K, V> {
    tiers: Vec<TierAndLimit<K, V>>,
    source: Option<TierAndLimit<K, V>>,
    backplane: Option<Arc<dyn Backplane<K, V>>>,
    clock: Clock,
    policy: Policy,
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
            clock: Clock::system(),
            policy: Policy {
                breaker: BreakerPolicy::default(),
                background_backfill: false,
                single_flight: true,
                negative_ttl: Some(DEFAULT_NEGATIVE_TTL),
                max_stale: Some(DEFAULT_MAX_STALE),
                floor_ttl: DEFAULT_FLOOR_TTL,
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
    pub fn source(self, source: impl CacheTier<K, V> + 'static) -> Self {
        self.shared_source(Arc::new(source), Some(DEFAULT_SOURCE_TIMEOUT))
    }

    /// Sets the authoritative source with its own time limit per call (`None`: no limit).
    pub fn source_with_timeout(
        self,
        source: impl CacheTier<K, V> + 'static,
        timeout: Option<Duration>,
    ) -> Self {
        self.shared_source(Arc::new(source), timeout)
    }

    /// Sets a source you keep a handle to.
    pub fn shared_source(
        mut self,
        source: Arc<dyn CacheTier<K, V>>,
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
    /// Apply theirs with [`TieredCache::apply_remote_invalidation`].
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

    /// Builds the chain.
    ///
    /// # Errors
    /// [`Error::Config`] without a source, or with a zero time limit or TTL.
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
        Ok(TieredCache {
            inner: Arc::new(Inner {
                tiers: self
                    .tiers
                    .into_iter()
                    .map(|(tier, timeout)| Level::new(tier, timeout, self.policy.breaker))
                    .collect(),
                source: Level::new(source, source_timeout, self.policy.breaker),
                clock: self.clock,
                policy: self.policy,
                flights: Flights::new(),
                floors: Floors::new(),
                backplane: self.backplane,
                epoch: AtomicU64::new(0),
                counters: ChainCounters::default(),
            }),
        })
    }
}
