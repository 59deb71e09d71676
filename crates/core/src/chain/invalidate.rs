//! Invalidation: manual invalidation, another instance's changes, replays of missed
//! invalidations, flushes and clears. Every one marks what it changes before it touches a tier
//! and again after (`marks.rs`), so that a load running meanwhile does not put back what it
//! removed, and goes bottom first, so that no reader copies an old value up from a tier not yet
//! reached.

use std::sync::Arc;
use std::time::Duration;

use super::TieredCache;
use super::read::Filled;
use super::tasks::join;
use crate::entry::{Entry, Version};
use crate::error::{Error, Result};
use crate::tier::{Key, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Removes `key` from every cache tier, bottom first, for a change made behind the chain's
    /// back (writes through [`update`](TieredCache::update) need no invalidation), and tells
    /// the other instances. Loads already running in this chain skip their back-fill; the next
    /// read asks the source. A tier that cannot be reached gets the invalidation replayed
    /// before it serves the key again. Every tier is tried; the first failure is returned.
    ///
    /// It runs in a task of its own: a caller that gives up does not stop it half way.
    pub async fn invalidate(&self, key: &K) -> Result<()> {
        use tracing::Instrument;
        let (this, key) = (self.clone(), key.clone());
        let task = self.inner.tasks.spawn(
            async move { this.invalidate_everywhere(&key, None).await }
                .instrument(tracing::debug_span!("tiercache.invalidate")),
        );
        join(task).await
    }

    /// Drops the copies of `key` older than `below` (`None`: whatever is held) from every
    /// cache tier, bottom first, marking the key before and after, and publishes it. Returns
    /// the first tier's failure (the others were tried; each failure is replayed later).
    ///
    /// Without a version, everything is done once more after the longest cache tier time
    /// limit, in a task of its own: a fill already on its way to a lower tier (a load that
    /// began before, whose set lands after the pass) is taken back by its own check, but a
    /// reader could copy it up in between, and another instance's fill is checked by nobody
    /// here. The second pass removes both.
    pub(super) async fn invalidate_everywhere(
        &self,
        key: &K,
        below: Option<Version>,
    ) -> Result<()> {
        let result = self.invalidate_pass(key, below).await;
        if below.is_none() {
            let key = key.clone();
            self.after_fill_grace(move |this| async move {
                let _ = this.invalidate_pass(&key, None).await;
            });
        }
        result
    }

    /// Runs `pass` in a task of its own once the longest cache-tier time limit has passed (by
    /// then, every fill that was on its way has landed), if the chain is still alive.
    fn after_fill_grace<F, Fut>(&self, pass: F)
    where
        F: FnOnce(TieredCache<K, V>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (chain, grace) = (self.downgrade(), self.inner.policy.fill_grace);
        self.inner.tasks.spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(this) = chain.upgrade() {
                pass(this).await;
            }
        });
    }

    async fn invalidate_pass(&self, key: &K, below: Option<Version>) -> Result<()> {
        let inner = &*self.inner;
        inner.marks.mark(key, below);
        inner.flights.forget(key);
        let at = below.map(|v| v.saturating_sub(1));
        let (_, first_error) = self.invalidate_tiers(key, at).await;
        inner.marks.mark(key, below);
        self.publish(key, below, None).await;
        first_error.map_or(Ok(()), Err)
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

    /// Applies another instance's update or invalidation (from a [`Backplane`](crate::Backplane))
    /// to the top tier. With a `value` (the value at `version`) and a copy of `key` held, the
    /// copy is replaced by the new version, so that a hot key stays hot; otherwise copies older
    /// than `version` are dropped (`None`: whatever is held). Loads running now in this chain
    /// skip their back-fill of the key. A key not held costs nothing in the tier (no tombstone
    /// that could evict a hot entry). The tier's version rules make a late message harmless:
    /// it never replaces or evicts a newer entry.
    pub async fn apply_remote_invalidation(
        &self,
        key: &K,
        version: Option<Version>,
        value: Option<Arc<V>>,
    ) {
        let inner = &*self.inner;
        inner.counters.remote_invalidations.incr();
        // Marked before the tier is looked at: a load that fills the key after this either sees
        // the mark, or filled it before the look below, which then finds it.
        let ticket = inner.marks.mark(key, version);
        inner.flights.forget(key);
        let Some(top) = inner.tiers.first() else {
            return;
        };
        let below = version.map(|v| v.saturating_sub(1));
        let held = match top
            .call("get_stale", top.tier.get_stale(key, Duration::MAX))
            .await
        {
            Ok(Some(entry)) => Some(entry.version),
            // Not held: nothing to drop.
            Ok(None) => {
                inner.marks.mark(key, version);
                return;
            }
            // The tier cannot say: drop whatever it holds (now or when it answers again).
            Err(_) => None,
        };
        let current = match (held, version, value) {
            // A late message: what is held is as new.
            (Some(held), Some(version), _) if held >= version => true,
            // Like any fill: a later change (a newer version's message overtaking this one)
            // wins over it, and then the held copy is dropped below.
            (Some(_), Some(version), Some(value)) => {
                self.fill(0, key, &Entry::new(value, version), ticket).await == Filled::Stored
            }
            _ => false,
        };
        if !current {
            let _ = self.invalidate_at(0, key, below).await;
        }
        inner.marks.mark(key, version);
    }

    /// Replays now the invalidations cache tiers missed while they were unreachable (a task of
    /// each tier's own replays them anyway, retrying with a backoff; no read uses a tier for a
    /// key whose replay is pending). Returns the first failure; what failed stays for the next
    /// try.
    pub async fn repair(&self) -> Result<()> {
        let mut first_error = None;
        for level in &self.inner.tiers {
            if let Err(e) = level.replay_now().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Empties the top (in-process) tier, for when this instance may have missed invalidations
    /// (its backplane subscription dropped). Loads running now skip their back-fill.
    pub async fn flush_local(&self) {
        if self.inner.tiers.is_empty() {
            self.inner.marks.mark_all();
        } else {
            let _ = self.clear_pass(0).await;
        }
        tracing::info!("top tier flushed: invalidations may have been missed");
    }

    /// Empties every cache tier (never the source), bottom first. Every tier is tried; the
    /// first failure is returned.
    pub async fn clear(&self) -> Result<()> {
        let mut first_error = None;
        for i in (0..self.inner.tiers.len()).rev() {
            if let Err(e) = self.clear_tier(i).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Empties cache tier `index` (0 is the top). Loads running now skip their back-fill.
    ///
    /// Like a manual invalidation, it runs in a task of its own (a caller that gives up does
    /// not stop it half way), and a shared tier is emptied once more after the longest cache
    /// tier time limit: a clear leaves no tombstones, so another instance's fill that was
    /// already on its way (of a version a write has since replaced) could land in the emptied
    /// tier; the second pass removes it. A local tier, which only this instance fills
    /// ([`CacheTier::is_local`](crate::CacheTier::is_local)), is emptied once.
    pub async fn clear_tier(&self, index: usize) -> Result<()> {
        if index >= self.inner.tiers.len() {
            return Err(Error::InvalidInput(format!(
                "no cache tier {index}; the chain has {}",
                self.inner.tiers.len()
            )));
        }
        let this = self.clone();
        let task = self.inner.tasks.spawn(async move {
            let result = this.clear_pass(index).await;
            if this.inner.tiers[index].tier.is_local() {
                // No other instance fills it; this one's fills that began before are refused.
                return result;
            }
            this.after_fill_grace(move |this| async move {
                if let Err(error) = this.clear_pass(index).await {
                    tracing::debug!(%error, "the second pass of a clear failed");
                }
            });
            result
        });
        join(task).await
    }

    async fn clear_pass(&self, index: usize) -> Result<()> {
        self.inner.marks.mark_all();
        // No request that starts after the clear joins a load that began before it.
        self.inner.flights.forget_all();
        let level = &self.inner.tiers[index];
        level.call("clear", level.tier.clear()).await
    }
}
