//! The write path: the source first, then every cache tier invalidated at the previous
//! version and repopulated, floors for tiers it could not reach, and the publish to the other
//! instances.

use std::sync::Arc;
use std::time::Duration;

use super::TieredCache;
use crate::entry::{Entry, Version};
use crate::error::Result;
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
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

    pub(super) async fn publish(&self, key: &K, version: Option<Version>, value: Option<Arc<V>>) {
        if let Some(backplane) = &self.inner.backplane {
            if let Err(error) = backplane.publish(key, version, value).await {
                self.inner.counters.backplane_errors.incr();
                tracing::warn!(%error, "could not publish an invalidation");
            }
        }
    }
}
