//! One level of the chain: a tier (or the source), its time limit, its circuit breaker and
//! the chain's counters for it. What the tier missed, and its replay, is `repairs.rs`.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::repairs::Repairs;
use crate::breaker::{Access, Breaker, BreakerPolicy};
use crate::error::{Error, Result};
use crate::latency::LatencyHistogram;
use crate::source::Source;
use crate::stats::{ChainTierStats, Counter, TierStats, hit_rate};
use crate::tier::{CacheTier, Key, Value};

/// What a level needs of its tier: a cache tier or the source.
pub(super) trait Described {
    fn tier_name(&self) -> &str;
    fn tier_stats(&self) -> TierStats;
}

impl<K: Key, V: Value> Described for dyn CacheTier<K, V> {
    fn tier_name(&self) -> &str {
        self.name()
    }
    fn tier_stats(&self) -> TierStats {
        self.stats()
    }
}

impl<K: Key, V: Value> Described for dyn Source<K, V> {
    fn tier_name(&self) -> &str {
        self.name()
    }
    fn tier_stats(&self) -> TierStats {
        self.stats()
    }
}

/// One level of the chain: a cache tier (or, with `T = dyn Source`, the source), its time
/// limit and the chain's counters for it.
pub(super) struct Level<K, V, T: ?Sized = dyn CacheTier<K, V>> {
    pub(super) tier: Arc<T>,
    pub(super) name: String,
    pub(super) timeout: Option<Duration>,
    pub(super) breaker: Breaker,
    pub(super) repairs: Repairs<K>,
    /// Whether the last call failed for a transient reason: failures are logged when this
    /// changes, not once per call.
    failing: AtomicBool,
    pub(super) hits: Counter,
    pub(super) misses: Counter,
    pub(super) errors: Counter,
    pub(super) timeouts: Counter,
    pub(super) skipped: Counter,
    pub(super) latency: LatencyHistogram,
    #[cfg(feature = "metrics")]
    pub(super) call_seconds: metrics::Histogram,
    _value: PhantomData<fn() -> V>,
}

impl<K: Key, V: Value, T: Described + ?Sized> Level<K, V, T> {
    pub(super) fn new(
        tier: Arc<T>,
        timeout: Option<Duration>,
        breaker: BreakerPolicy,
        max_repairs: usize,
    ) -> Self {
        let name = tier.tier_name().to_owned();
        Level {
            #[cfg(feature = "metrics")]
            call_seconds: metrics::histogram!("tiercache_tier_call_seconds", "tier" => name.clone()),
            name,
            tier,
            timeout,
            breaker: Breaker::new(breaker),
            repairs: Repairs::new(max_repairs),
            failing: AtomicBool::new(false),
            hits: Counter::default(),
            misses: Counter::default(),
            errors: Counter::default(),
            timeouts: Counter::default(),
            skipped: Counter::default(),
            latency: LatencyHistogram::default(),
            _value: PhantomData,
        }
    }

    /// Runs one call to the tier under its time limit and its breaker; counts and traces a
    /// failure. While the breaker is open the call is skipped with [`Error::CircuitOpen`].
    // Plain functions returning `call_as`'s future: no second state machine around it.
    pub(super) fn call<R>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<R>>,
    ) -> impl Future<Output = Result<R>> {
        self.call_as(op, fut, true)
    }

    /// [`call`](Self::call) for [`CacheTier::get_stale`], whose success says nothing about the
    /// tier: the default answers `Ok(None)` without asking it. A failure counts toward the
    /// breaker as any other; a success does not close it. (Counting it did: with the database
    /// down too, every read's fail-safe lookup reset a down Redis's breaker, which then never
    /// opened: `userconfig/tests/faults.rs`, `a_down_server_is_asked_at_most_once_per_cool_down`.)
    pub(super) fn call_stale<R>(
        &self,
        fut: impl Future<Output = Result<R>>,
    ) -> impl Future<Output = Result<R>> {
        self.call_as("get_stale", fut, false)
    }

    async fn call_as<R>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<R>>,
        success_is_news: bool,
    ) -> Result<R> {
        let permit = self.breaker.permit();
        if permit.access() == Access::Skip {
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
        let transient = result.as_ref().err().is_some_and(Error::is_transient);
        if transient || success_is_news {
            permit.record(!transient);
        }
        if let Err(error) = &result {
            self.errors.incr();
            if error.is_timeout() {
                self.timeouts.incr();
            }
            tracing::debug!(tier = %self.name, op, %error, "tier call failed");
        }
        if (transient || success_is_news)
            && self.failing.load(Ordering::Relaxed) != transient
            && self.failing.swap(transient, Ordering::Relaxed) != transient
        {
            match &result {
                Err(error) => tracing::warn!(tier = %self.name, op, %error, "tier failing"),
                Ok(_) => {
                    tracing::info!(tier = %self.name, "tier answers again");
                    // What it missed is replayed now, not at the end of a back-off.
                    self.repairs.wake.notify_one();
                }
            }
        }
        result
    }

    pub(super) fn stats(&self) -> ChainTierStats {
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
            pending_repairs: self.repairs.len() as u64,
            latency: self.latency.summary(),
            hit_rate: hit_rate(hits, misses),
            tier: self.tier.tier_stats(),
        }
    }
}
