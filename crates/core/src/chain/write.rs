//! The write path (updates, conditional updates, deletes): the source first, then every cache
//! tier, bottom first, invalidated at the previous version and repopulated; floors and
//! replays for the tiers it could not reach; the publish to the other instances. A write runs
//! in a task of its own, so that a caller that gives up does not leave it half done, and a
//! write whose outcome is unknown is settled.

use std::sync::Arc;

use super::TieredCache;
use super::steps::Filled;
use super::tasks::join;
use crate::entry::{Entry, Version};
use crate::error::Result;
use crate::feed::Change;
use crate::source::Written;
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Writes `value` to the source, then invalidates every cache tier, bottom first, at the
    /// previous version and repopulates it with the new one, and tells the other instances
    /// (the backplane). Returns the new version.
    ///
    /// * If the source refuses the write, the error is returned and no cache is touched.
    /// * If the value equals the stored one, the source commits nothing (no new version) and
    ///   no cache is invalidated and nothing is published: the stored version is returned and
    ///   the write is counted in [`ChainStats::unchanged_writes`](crate::ChainStats); the
    ///   caches are filled with it like after a read.
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
        self.change(key, Some(value), None, None).await
    }

    /// [`update`](Self::update) (or, with `expected`, [`update_if`](Self::update_if)), naming
    /// who makes the change for the source's history ([`Source::write_by`](crate::Source::write_by)).
    ///
    /// # Errors
    /// As [`update_if`](Self::update_if).
    pub async fn update_by(
        &self,
        key: &K,
        value: Arc<V>,
        expected: Option<Version>,
        author: &str,
    ) -> Result<Version> {
        self.change(key, Some(value), expected, Some(Arc::from(author)))
            .await
    }

    /// [`delete`](Self::delete) (or, with `expected`, [`delete_if`](Self::delete_if)), naming
    /// who makes the change (see [`update_by`](Self::update_by)).
    ///
    /// # Errors
    /// As [`delete_if`](Self::delete_if).
    pub async fn delete_by(
        &self,
        key: &K,
        expected: Option<Version>,
        author: &str,
    ) -> Result<Version> {
        self.change(key, None, expected, Some(Arc::from(author)))
            .await
    }

    /// [`update`](Self::update) if the key's stored version is still `expected` (0: nothing
    /// is stored), as one atomic step in the source: a compare-and-set for read-modify-write.
    ///
    /// # Errors
    /// [`Error::Conflict`](crate::Error::Conflict) with the stored version if someone changed
    /// the key since `expected` was read (no cache is touched); read it again from the source
    /// ([`load`](Self::load)) and retry. Otherwise as [`update`](Self::update).
    pub async fn update_if(&self, key: &K, expected: Version, value: Arc<V>) -> Result<Version> {
        self.change(key, Some(value), Some(expected), None).await
    }

    /// Deletes `key` in the source, then every cache tier holds a "not found" at the delete's
    /// version (or a tombstone refusing older versions, without negative caching), and tells
    /// the other instances. Returns the delete's version, or 0 if nothing was stored (then
    /// nothing is touched). A later write gets a greater version and wins everywhere. Failures
    /// and cancellation as for [`update`](Self::update).
    pub async fn delete(&self, key: &K) -> Result<Version> {
        self.change(key, None, None, None).await
    }

    /// [`delete`](Self::delete) if the key's stored version is still `expected`.
    ///
    /// # Errors
    /// [`Error::Conflict`](crate::Error::Conflict) as for [`update_if`](Self::update_if).
    pub async fn delete_if(&self, key: &K, expected: Version) -> Result<Version> {
        self.change(key, None, Some(expected), None).await
    }

    /// A write (`value`) or a delete (`None`), in a task of its own.
    async fn change(
        &self,
        key: &K,
        value: Option<Arc<V>>,
        expected: Option<Version>,
        author: Option<Arc<str>>,
    ) -> Result<Version> {
        use tracing::Instrument;
        let span = if value.is_some() {
            tracing::debug_span!("tiercache.update", version = tracing::field::Empty)
        } else {
            tracing::debug_span!("tiercache.delete", version = tracing::field::Empty)
        };
        let (this, owned) = (self.clone(), key.clone());
        let task = self.inner.tasks.spawn(
            async move {
                this.change_inner(&owned, value, expected, author.as_deref())
                    .await
            }
            .instrument(span.clone()),
        );
        let result = join(task).await;
        if let Ok(version) = &result {
            span.record("version", version);
        }
        result
    }

    async fn change_inner(
        &self,
        key: &K,
        value: Option<Arc<V>>,
        expected: Option<Version>,
        author: Option<&str>,
    ) -> Result<Version> {
        let inner = &*self.inner;
        // Taken before the source is asked, like a load's: an unchanged write fills with it.
        let before = inner.marks.ticket();
        let source = &inner.source;
        let written = match (&value, author) {
            (Some(value), None) => {
                source
                    .call("write", source.tier.write(key, Arc::clone(value), expected))
                    .await
            }
            (Some(value), Some(author)) => {
                let write = source
                    .tier
                    .write_by(key, Arc::clone(value), expected, author);
                source.call("write", write).await
            }
            (None, None) => {
                source
                    .call("delete", source.tier.delete(key, expected))
                    .await
            }
            (None, Some(author)) => {
                source
                    .call("delete", source.tier.delete_by(key, expected, author))
                    .await
            }
        };
        let version = match written {
            Ok(Written::Changed(version)) => version,
            Ok(Written::Unchanged(version)) => {
                inner.counters.unchanged.incr();
                if let Some(value) = value {
                    let entry = Entry::new(value, version);
                    self.backfill_with(key, &entry, inner.tiers.len(), before, false)
                        .await;
                }
                return Ok(version);
            }
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
        let entry = match &value {
            Some(value) => Some(Entry::new(Arc::clone(value), version)),
            None => inner
                .policy
                .negative_ttl
                .map(|ttl| Entry::absent(version).expiring_at(inner.clock.now() + ttl)),
        };
        // With an entry to fill, the tombstone sits just below it; without one (a delete and
        // no negative caching), at the delete itself.
        let dead = if entry.is_some() {
            version.saturating_sub(1)
        } else {
            version
        };
        let (missed, _) = self.invalidate_tiers(key, Some(dead)).await;
        if let Some(entry) = &entry {
            for (index, _) in missed.iter().enumerate().rev().filter(|(_, m)| !**m) {
                // A set that fails leaves at worst a tombstone against older versions; one
                // that a later change overtakes (another instance's newer version) is taken
                // back.
                if self.fill(index, key, entry, ticket).await == Filled::Refused {
                    break;
                }
            }
        }
        if missed.iter().any(|m| *m) {
            tracing::debug!(
                version,
                "change could not reach every cache tier; raising a floor"
            );
            self.raise_floor(key, version);
        }
        inner.marks.mark(key, Some(version));
        if inner.observers.wanted() {
            inner.observers.send(match &value {
                Some(value) => Change::written(key.clone(), version).with_value(Arc::clone(value)),
                None => Change::deleted(key.clone(), version),
            });
        }
        self.publish(key, Some(version), value).await;
        Ok(version)
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
        if let Some(backplane) = &self.inner.backplane
            && let Err(error) = backplane.publish(key, version, value).await
        {
            self.inner.counters.backplane_errors.incr();
            tracing::debug!(%error, "could not publish an invalidation");
        }
    }
}
