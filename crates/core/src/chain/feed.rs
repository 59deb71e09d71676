//! The source's change feed, applied: every change the source committed, by any writer (this
//! chain, another instance, `psql`), reaches this chain's cache tiers within the feed's delay,
//! whether or not any other path (the write path, the backplane) told it already.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::oneshot;

use super::read::Filled;
use super::{TieredCache, WeakTieredCache};
use crate::entry::{Entry, Version};
use crate::feed::{Change, ChangeFeed};
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Applies one change the source committed (its feed does this by itself; call it to
    /// replay a change you learned of otherwise). Copies of the key older than the change's
    /// version are dropped from every cache tier, bottom first (newer copies survive, so a late
    /// or repeated change is harmless; a local tier that does not hold the key is not touched),
    /// loads running now skip their back-fill, and a delete leaves "not found" at its version
    /// for the negative TTL where it dropped a copy. A tier that cannot be reached
    /// gets the invalidation replayed before it serves the key again, and this chain refuses
    /// older versions of the key meanwhile (a floor). [`Change::Everything`] empties every
    /// cache tier.
    pub async fn apply_change(&self, change: Change<K>) {
        match change {
            Change::Key {
                key,
                version,
                deleted,
            } => self.apply_key_change(&key, version, deleted).await,
            Change::Everything => {
                self.inner.counters.feed_flushes.incr();
                tracing::info!(
                    "the source's feed may have lost changes: emptying every cache tier"
                );
                if let Err(error) = self.clear().await {
                    tracing::warn!(%error, "a cache tier could not be emptied");
                }
            }
        }
    }

    async fn apply_key_change(&self, key: &K, version: Version, deleted: bool) {
        let inner = &*self.inner;
        inner.counters.feed_changes.incr();
        let ticket = inner.marks.mark(key, Some(version));
        inner.flights.forget(key);
        let absent = if deleted {
            inner
                .policy
                .negative_ttl
                .map(|ttl| Entry::absent(version).expiring_at(inner.clock.now() + ttl))
        } else {
            None
        };
        // Just below the change, so that the change itself can be filled; at a delete itself
        // when no "not found" will be filled.
        let dead = if deleted && absent.is_none() {
            version
        } else {
            version.saturating_sub(1)
        };
        // Bottom first, like every invalidation. A local tier that does not hold the key (or
        // holds the change already) is left alone: only this process fills it, and the mark
        // refuses the fills of loads that began before; a tombstone there would only take the
        // place of a hot entry (most changes are of keys an instance does not hold).
        let levels = inner.tiers.len();
        let mut missed = vec![false; levels];
        let mut reached = vec![false; levels];
        for index in (0..levels).rev() {
            let level = &inner.tiers[index];
            if level.tier.is_local() {
                let held = level
                    .call("get_stale", level.tier.get_stale(key, Duration::MAX))
                    .await;
                match held {
                    Ok(None) => continue,
                    Ok(Some(entry)) if entry.version >= version => continue,
                    _ => {}
                }
            }
            if self.invalidate_at(index, key, Some(dead)).await.is_err() {
                missed[index] = true;
            } else {
                reached[index] = true;
            }
        }
        if let Some(entry) = &absent {
            for (index, _) in reached.iter().enumerate().rev().filter(|(_, r)| **r) {
                if self.fill(index, key, entry, ticket).await == Filled::Refused {
                    break;
                }
            }
        }
        if missed.iter().any(|m| *m) {
            self.raise_floor(key, version);
        }
        inner.marks.mark(key, Some(version));
    }
}

/// Applies `feed` to the chain until the chain is dropped (`stop` fires) or the feed ends. Holds
/// the chain only while it applies a batch.
pub(super) fn follow<K: Key, V: Value>(
    chain: WeakTieredCache<K, V>,
    mut feed: ChangeFeed<K>,
    mut stop: oneshot::Receiver<()>,
) {
    tokio::spawn(async move {
        loop {
            // The chain's drop (stop) or the next batch, whichever comes first.
            let next = std::future::poll_fn(|cx| {
                if Pin::new(&mut stop).poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                feed.poll_recv(cx).map(Some)
            })
            .await;
            let Some(batch) = next else { return };
            let Some(batch) = batch else {
                tracing::warn!("the source's change feed ended");
                return;
            };
            let Some(this) = chain.upgrade() else { return };
            for change in batch {
                this.apply_change(change).await;
            }
        }
    });
}
