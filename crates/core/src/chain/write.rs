//! The write path: the source first, then every cache tier, bottom first, invalidated at the
//! previous version and repopulated; floors and replays for the tiers it could not reach; the
//! publish to the other instances. A write runs in a task of its own, so that a caller that
//! gives up does not leave it half done, and a write whose outcome is unknown is settled.

use std::sync::Arc;
use std::time::Duration;

use super::TieredCache;
use super::read::Filled;
use super::tasks::join;
use crate::entry::{Entry, Version};
use crate::error::Result;
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Writes `value` to the source, then invalidates every cache tier, bottom first, at the
    /// previous version and repopulates it with the new one, and tells the other instances
    /// (the backplane). Returns the new version.
    ///
    /// * If the source refuses the write, the error is returned and no cache is touched.
    /// * If its outcome is unknown (it timed out or lost its connection, so it may commit
    ///   anyway), the error is returned and the key is invalidated in every tier now, and
    ///   again once the write can no longer commit (the builder's `write_settle`): whatever it
    ///   did, no cache keeps the version it would have replaced.
    /// * A cache tier that fails here is counted and skipped; the invalidation is replayed
    ///   before that tier serves the key again, and until the floor TTL passes this chain
    ///   refuses versions older than the one written, from any tier.
    ///
    /// The write runs in a task of its own: a caller that gives up at any point (a timeout, a
    /// dropped request) does not stop it half way.
    pub async fn update(&self, key: &K, value: Arc<V>) -> Result<Version> {
        use tracing::Instrument;
        let span = tracing::debug_span!("tiercache.update", version = tracing::field::Empty);
        let (this, owned) = (self.clone(), key.clone());
        let task = self
            .inner
            .tasks
            .spawn(async move { this.update_inner(&owned, value).await }.instrument(span.clone()));
        let result = join(task).await;
        if let Ok(version) = &result {
            span.record("version", version);
        }
        result
    }

    async fn update_inner(&self, key: &K, value: Arc<V>) -> Result<Version> {
        let inner = &*self.inner;
        let written = inner
            .source
            .call("write", inner.source.tier.write(key, Arc::clone(&value)))
            .await;
        let version = match written {
            Ok(version) => version,
            Err(error) => {
                if error.outcome_unknown() {
                    tracing::warn!(%error, "write outcome unknown; invalidating the key everywhere");
                    let (this, key) = (self.clone(), key.clone());
                    inner.tasks.spawn(async move { this.settle(key).await });
                }
                return Err(error);
            }
        };
        inner.counters.updates.incr();
        // Loads that began before this, and copies older than `version`, fill nothing now.
        let ticket = inner.marks.mark(key, Some(version));
        // No request that starts after this returns may join a load that began before it.
        inner.flights.forget(key);
        let previous = version.saturating_sub(1);
        let (missed, _) = self.invalidate_tiers(key, Some(previous)).await;
        let entry = Entry::new(Arc::clone(&value), version);
        for (index, _) in missed.iter().enumerate().rev().filter(|(_, m)| !**m) {
            // A set that fails leaves at worst a tombstone against older versions; one that a
            // later change overtakes (another instance's newer version) is taken back.
            if self.fill(index, key, &entry, ticket).await == Filled::Refused {
                break;
            }
        }
        if missed.iter().any(|m| *m) {
            tracing::debug!(
                version,
                "update could not reach every cache tier; raising a floor"
            );
            self.raise_floor(key, version);
        }
        inner.marks.mark(key, Some(version));
        self.publish(key, Some(version), Some(value)).await;
        Ok(version)
    }

    /// Refuses versions of `key` older than `version` at every tier for the floor TTL.
    fn raise_floor(&self, key: &K, version: Version) {
        let inner = &*self.inner;
        // A stale copy may be served up to max-stale past its expiry: outlive that too.
        let life = inner.policy.floor_ttl + inner.policy.max_stale.unwrap_or(Duration::ZERO);
        inner.floors.raise(key, version, inner.clock.now(), life);
    }

    /// Settles a write whose outcome is unknown: every tier drops `key` now (a reader then
    /// asks the source), and once the write can no longer commit, every tier drops what is
    /// older than the source's version then, and the other instances are told both times.
    async fn settle(self, key: K) {
        // A tier that fails gets it replayed.
        let _ = self.invalidate_everywhere(&key, None).await;
        let settle = self.inner.policy.write_settle;
        let chain = self.downgrade();
        drop(self);
        tokio::time::sleep(settle).await;
        let Some(this) = chain.upgrade() else { return };
        let source = &this.inner.source;
        let now = match source.call("get", source.tier.get(&key)).await {
            Ok(Some(entry)) => Some(entry.version),
            Ok(None) | Err(_) => None,
        };
        tracing::debug!(version = now, "settling a write of unknown outcome");
        let _ = this.invalidate_everywhere(&key, now).await;
        if let Some(version) = now {
            this.raise_floor(&key, version);
        }
    }

    pub(super) async fn publish(&self, key: &K, version: Option<Version>, value: Option<Arc<V>>) {
        if let Some(backplane) = &self.inner.backplane {
            if let Err(error) = backplane.publish(key, version, value).await {
                self.inner.counters.backplane_errors.incr();
                tracing::debug!(%error, "could not publish an invalidation");
            }
        }
    }
}
