//! The steps the read, write, invalidation and remote-change paths share, written once: whether
//! a tier may serve a key, a marked fill (and taking it back), an invalidation at a version
//! (remembered for replay when the tier cannot be reached), and a floor. The path files only
//! call down to these.

use std::sync::Arc;
use std::time::Duration;

use super::TieredCache;
use super::marks::{Ticket, Verdict};
use crate::entry::{Entry, Version};
use crate::error::{Error, Result};
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Cache tier `i`'s answer for `key`, if it may be served: not below the key's floor, not
    /// older than a version this chain knows of (a change it applied or made: the tier may not
    /// have dropped its copy yet, say another instance's invalidation of Redis still on its
    /// way), and no replay of a missed invalidation of it pending. An entry refused by its
    /// floor or a newer version is counted as refused; anything not served counts as the
    /// tier's miss (its hits are counted with the request's outcome).
    pub(super) fn usable(&self, i: usize, key: &K, found: Option<Entry<V>>) -> Option<Entry<V>> {
        let inner = &*self.inner;
        if let Some(entry) = found {
            let floored = !inner.floors.allows(key, entry.version, &inner.clock)
                || entry.version < inner.marks.newest(key);
            if !floored && !inner.tiers[i].repairs.blocks(key) {
                return Some(entry);
            }
            if floored {
                inner.counters.refused.incr();
            }
        }
        inner.tiers[i].misses.incr();
        None
    }

    /// Stores `entry` in cache tier `index` if no change to `key` came after `ticket` and none
    /// announced a newer version, checked before the set and again after it: a set that
    /// landed after such a change is taken back. Whatever the tier's LRU evicted meanwhile, an
    /// older version is not put back. (A failed set is counted by the level.)
    pub(super) async fn fill(
        &self,
        index: usize,
        key: &K,
        entry: &Entry<V>,
        ticket: Ticket,
    ) -> Filled {
        let marks = &self.inner.marks;
        let level = &self.inner.tiers[index];
        if !marks.admits(key, ticket, entry.version) {
            return Filled::Refused;
        }
        // If the caller gives up between the set and the check after it, the check still runs
        // (in a task).
        let mut guard = FillGuard {
            chain: self,
            key,
            index,
            ticket,
            version: entry.version,
            armed: true,
        };
        let stored = level.call("set", level.tier.set(key, entry.clone())).await;
        let verdict = marks.check(key, ticket, entry.version);
        // A set that failed (timed out) may land all the same: take it back too.
        if !matches!(stored, Ok(false)) && verdict != Verdict::Admit {
            self.inner.counters.backfills_skipped.incr();
            self.take_back(index, key, verdict, entry.version).await;
            guard.armed = false;
            return Filled::Refused;
        }
        guard.armed = false;
        if matches!(stored, Ok(true)) {
            Filled::Stored
        } else {
            Filled::NotStored
        }
    }

    /// Takes back a fill of `version` that may have landed in tier `index` after a change the
    /// marks judged by `verdict`; if the tier cannot be reached, it is replayed later.
    async fn take_back(&self, index: usize, key: &K, verdict: Verdict, version: Version) {
        let _ = self.invalidate_at(index, key, verdict.undo(version)).await;
    }

    /// Invalidates `key` at `version` (see [`CacheTier::invalidate`](crate::CacheTier::invalidate))
    /// in every cache tier, bottom first: were the top tier emptied first, a reader could miss
    /// it, find the old copy still below and copy it back up. A tier that fails gets the
    /// invalidation replayed later. Returns which tiers missed it, and the first failure.
    pub(super) async fn invalidate_tiers(
        &self,
        key: &K,
        version: Option<Version>,
    ) -> (Vec<bool>, Option<Error>) {
        let inner = &*self.inner;
        let mut missed = vec![false; inner.tiers.len()];
        let mut first_error = None;
        for i in (0..inner.tiers.len()).rev() {
            if let Err(error) = self.invalidate_at(i, key, version).await {
                missed[i] = true;
                first_error.get_or_insert(error);
            }
        }
        (missed, first_error)
    }

    /// Invalidates `key` at `version` in cache tier `index`; if the tier fails, the
    /// invalidation is remembered and replayed later.
    pub(super) async fn invalidate_at(
        &self,
        index: usize,
        key: &K,
        version: Option<Version>,
    ) -> Result<()> {
        let level = &self.inner.tiers[index];
        let done = level
            .call("invalidate", level.tier.invalidate(key, version))
            .await;
        if done.is_err() {
            self.remember(index, key, version);
        }
        done
    }

    /// Remembers that cache tier `index` missed an invalidation of `key`; a task of the level's
    /// own replays it.
    pub(super) fn remember(&self, index: usize, key: &K, version: Option<Version>) {
        self.inner.tiers[index].remember(key, version, &Arc::downgrade(&self.inner), index);
    }

    /// Refuses versions of `key` older than `version` at every tier for the floor TTL.
    pub(super) fn raise_floor(&self, key: &K, version: Version) {
        let inner = &*self.inner;
        // A stale copy may be served up to max-stale past its expiry: outlive that too.
        let life = inner.policy.floor_ttl + inner.policy.max_stale.unwrap_or(Duration::ZERO);
        inner.floors.raise(key, version, inner.clock.now(), life);
    }
}

/// A back-fill's set in progress. Dropped before the check that follows the set (its caller
/// gave up), it runs the check in a task: were the key changed meanwhile, the filled copy is
/// taken back.
struct FillGuard<'a, K: Key, V: Value> {
    chain: &'a TieredCache<K, V>,
    key: &'a K,
    index: usize,
    ticket: Ticket,
    version: Version,
    armed: bool,
}

impl<K: Key, V: Value> Drop for FillGuard<'_, K, V> {
    fn drop(&mut self) {
        if !self.armed || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (chain, key, index, ticket, version) = (
            self.chain.clone(),
            self.key.clone(),
            self.index,
            self.ticket,
            self.version,
        );
        self.chain.inner.tasks.spawn(async move {
            let verdict = chain.inner.marks.check(&key, ticket, version);
            if verdict != Verdict::Admit {
                chain.take_back(index, &key, verdict, version).await;
            }
        });
    }
}

/// What became of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filled {
    /// The tier holds the entry.
    Stored,
    /// The tier failed, or kept what it held (a newer version, a tombstone).
    NotStored,
    /// The key changed since the load began: not stored, or taken back.
    Refused,
}
