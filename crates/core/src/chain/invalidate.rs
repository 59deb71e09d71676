//! Invalidation: manual invalidation, another instance's changes, replays of missed
//! invalidations, flushes and clears, and the epoch that stops loads running during one from
//! putting back what it removed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::TieredCache;
use crate::entry::{Entry, Version};
use crate::error::{Error, Result};
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Removes `key` from every cache tier, bottom first, for a change made behind the chain's back (writes
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
        // Bottom first, like an update: were the top tier emptied first, a reader could miss
        // it, find the old copy still below and copy it back up.
        for level in inner.tiers.iter().rev() {
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
}
