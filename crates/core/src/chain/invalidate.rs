//! Invalidation: manual invalidation, another instance's changes, replays of missed
//! invalidations, flushes and clears. Every one marks what it changes before it touches a tier
//! and again after (`marks.rs`), so that a load running meanwhile does not put back what it
//! removed, and goes bottom first, so that no reader copies an old value up from a tier not yet
//! reached.

use super::TieredCache;
use super::tasks::join;
use crate::entry::Version;
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

    pub(super) async fn clear_pass(&self, index: usize) -> Result<()> {
        self.inner.marks.mark_all();
        // No request that starts after the clear joins a load that began before it.
        self.inner.flights.forget_all();
        let level = &self.inner.tiers[index];
        level.call("clear", level.tier.clear()).await
    }
}
