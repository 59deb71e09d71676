//! One level of the chain: a tier, its time limit, its circuit breaker, the chain's counters
//! for it, and the invalidations it missed (replayed before it is read again).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::breaker::{Access, Breaker, BreakerPolicy};
use crate::entry::Version;
use crate::error::{Error, Result};
use crate::latency::LatencyHistogram;
use crate::stats::{ChainTierStats, Counter, hit_rate};
use crate::tier::{CacheTier, Key, Value};

/// One level of the chain: a tier, its time limit and the chain's counters for it.
pub(super) struct Level<K, V> {
    pub(super) tier: Arc<dyn CacheTier<K, V>>,
    pub(super) name: String,
    pub(super) timeout: Option<Duration>,
    pub(super) breaker: Breaker,
    /// Invalidations this tier missed (it was down or skipped), replayed before it is read
    /// again: key → the version to invalidate at (`None`: a manual invalidation).
    pub(super) repairs: Mutex<HashMap<K, Option<Version>>>,
    pub(super) repairs_len: AtomicUsize,
    pub(super) hits: Counter,
    pub(super) misses: Counter,
    pub(super) errors: Counter,
    pub(super) timeouts: Counter,
    pub(super) skipped: Counter,
    pub(super) latency: LatencyHistogram,
    #[cfg(feature = "metrics")]
    pub(super) call_seconds: metrics::Histogram,
}

impl<K: Key, V: Value> Level<K, V> {
    pub(super) fn new(
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
    pub(super) fn remember(&self, key: &K, version: Option<Version>) {
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
    pub(super) async fn repair(&self) -> Result<()> {
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
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
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
        permit.record(result.as_ref().err().is_none_or(|e| !e.is_transient()));
        if let Err(error) = &result {
            self.errors.incr();
            if error.is_timeout() {
                self.timeouts.incr();
            }
            tracing::debug!(tier = %self.name, op, %error, "tier call failed");
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
            pending_repairs: self.repairs_len.load(Ordering::Relaxed) as u64,
            latency: self.latency.summary(),
            hit_rate: hit_rate(hits, misses),
            tier: self.tier.stats(),
        }
    }
}
