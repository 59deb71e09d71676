//! The read path: the top tier's synchronous hit, then the tiers below, the source, back-fill,
//! negative entries, the fail-safe stale copy, batches and warming.

use std::sync::Arc;

use super::marks::Ticket;
use super::steps::Filled;
use super::{Fetched, Miss, Origin, TieredCache, Top};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::tier::{Key, Peek, Value};

impl<K: Key, V: Value> TieredCache<K, V> {
    /// The value for `key`: `Ok(None)` if the source does not have it.
    ///
    /// A hit in a top tier with a synchronous path ([`CacheTier::peek`](crate::CacheTier::peek)) completes without
    /// awaiting anything.
    #[inline]
    pub async fn get(&self, key: &K) -> Result<Option<Arc<V>>> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(entry.value),
            // Boxed, so that the future of a hit stays a few words: it is built and moved on
            // every call, the slow path's state machine is most of a kilobyte.
            Top::Continue(start) => Box::pin(self.fetch_slow(key, start)).await.map(|f| f.value),
        }
    }

    /// Like [`get`](TieredCache::get), with the version and the level that answered.
    pub async fn fetch(&self, key: &K) -> Result<Fetched<V>> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(Fetched::from_entry(entry, Origin::Tier(0))),
            Top::Continue(start) => Box::pin(self.fetch_slow(key, start)).await,
        }
    }

    /// The synchronous half of [`fetch`](TieredCache::fetch): the top tier's answer, if it
    /// has one without I/O, else a [`Miss`] to hand to [`fetch_after`](TieredCache::fetch_after)
    /// (the miss is already counted; do not call `fetch` for the same request).
    ///
    /// For callers that look keys up by a borrowed form: build the key in a reused buffer for
    /// `peek`, and own it only on a miss.
    #[inline]
    pub fn peek(&self, key: &K) -> Result<Fetched<V>, Miss> {
        match self.peek_top(key) {
            Top::Hit(entry) => Ok(Fetched::from_entry(entry, Origin::Tier(0))),
            Top::Continue(start) => Err(Miss { start }),
        }
    }

    /// The asynchronous half of [`fetch`](TieredCache::fetch), after [`peek`](TieredCache::peek)
    /// missed.
    pub async fn fetch_after(&self, key: &K, miss: Miss) -> Result<Fetched<V>> {
        Box::pin(self.fetch_slow(key, miss.start)).await
    }

    /// Asks the top tier's synchronous path, and counts its answer.
    #[inline(always)]
    fn peek_top(&self, key: &K) -> Top<V> {
        let inner = &*self.inner;
        let Some(top) = inner.tiers.first() else {
            return Top::Continue(0);
        };
        match top.tier.peek(key) {
            Peek::Hit(entry)
                if inner.floors.allows(key, entry.version, &inner.clock)
                    && !top.repairs.blocks(key) =>
            {
                top.hits.incr();
                Top::Hit(entry)
            }
            Peek::Hit(entry) => {
                // Older than a floor, or waiting for a missed invalidation's replay.
                self.usable(0, key, Some(entry));
                Top::Continue(1)
            }
            Peek::Miss => {
                top.misses.incr();
                Top::Continue(1)
            }
            Peek::Unsupported => Top::Continue(0),
        }
    }

    /// Everything after the top tier's synchronous path, from cache tier `start` down,
    /// coalesced per key.
    /// Every request that gets here runs in a `tiercache.get` span recording the tier that
    /// answered, the outcome and the version. (Hits in the top tier's synchronous path get no
    /// span: it would cost a quarter of the hit; they are counted in the stats and metrics.)
    async fn fetch_slow(&self, key: &K, start: usize) -> Result<Fetched<V>> {
        use tracing::Instrument;
        let inner = &*self.inner;
        let span = tracing::debug_span!(
            "tiercache.get",
            answered_by = tracing::field::Empty,
            outcome = tracing::field::Empty,
            version = tracing::field::Empty,
            coalesced = tracing::field::Empty,
        );
        let (result, led) = if inner.policy.single_flight {
            inner
                .flights
                .run(key, || self.read_through(key, start))
                .instrument(span.clone())
                .await
        } else {
            (
                self.read_through(key, start).instrument(span.clone()).await,
                true,
            )
        };
        if !led {
            inner.counters.coalesced.incr();
        }
        span.record("coalesced", !led);
        match &result {
            Ok(f) => {
                let (tier, outcome) = match f.origin {
                    Origin::Tier(i) => (inner.tiers[i].name.as_str(), "hit"),
                    Origin::Source if f.is_found() => (inner.source.name.as_str(), "found"),
                    Origin::Source => (inner.source.name.as_str(), "not_found"),
                    Origin::Stale(i) => (inner.tiers[i].name.as_str(), "stale"),
                };
                span.record("answered_by", tier);
                span.record("outcome", outcome);
                span.record("version", f.version);
            }
            Err(_) => {
                span.record("outcome", "error");
            }
        }
        self.count(&result);
        result
    }

    /// Counts a slow-path request's outcome (the fast path counts its own hits).
    fn count(&self, result: &Result<Fetched<V>>) {
        let c = &self.inner.counters;
        match result {
            Ok(f) => match f.origin {
                Origin::Tier(i) => self.inner.tiers[i].hits.incr(),
                Origin::Source if f.is_found() => c.source_found.incr(),
                Origin::Source => c.not_found.incr(),
                Origin::Stale(_) => c.stale_served.incr(),
            },
            Err(_) => c.failed.incr(),
        }
    }

    /// The miss path, run once per key however many callers wait for it.
    async fn read_through(&self, key: &K, start: usize) -> Result<Fetched<V>> {
        let inner = &*self.inner;
        let ticket = inner.marks.ticket();
        let background = inner.policy.background_backfill;
        for (i, level) in inner.tiers.iter().enumerate().skip(start) {
            if level.repairs.blocks(key) {
                // Its replay of an invalidation of this key is pending.
                level.misses.incr();
                continue;
            }
            let Ok(found) = level.call("get", level.tier.get(key)).await else {
                continue;
            };
            if let Some(entry) = self.usable(i, key, found) {
                tracing::trace!(tier = %level.name, "hit");
                self.backfill_with(key, &entry, i, ticket, background).await;
                return Ok(Fetched::from_entry(entry, Origin::Tier(i)));
            }
        }
        let source = &inner.source;
        inner.counters.source_loads.incr();
        match source.call("get", source.tier.get(key)).await {
            Ok(found) => Ok(self.sourced(key, found, ticket, background).await),
            Err(error) => self.fail_safe(key, error).await,
        }
    }

    /// The source's answer for `key`, never a cache's (after a
    /// [`Conflict`](crate::Error::Conflict): the version to retry against), back-filled into
    /// every cache tier like a miss's. Not coalesced with other loads, and never a stale copy:
    /// a source that fails is the error.
    pub async fn load(&self, key: &K) -> Result<Fetched<V>> {
        let inner = &*self.inner;
        let ticket = inner.marks.ticket();
        inner.counters.source_loads.incr();
        let source = &inner.source;
        let found = source.call("get", source.tier.get(key)).await?;
        Ok(self
            .sourced(key, found, ticket, inner.policy.background_backfill)
            .await)
    }

    /// The source's answer for `key`, back-filled into every cache tier: the entry without an
    /// expiry (each tier applies its own TTL), or a "not found" cached for the negative TTL.
    async fn sourced(
        &self,
        key: &K,
        found: Option<Entry<V>>,
        ticket: Ticket,
        background: bool,
    ) -> Fetched<V> {
        let inner = &*self.inner;
        let below = inner.tiers.len();
        match found {
            Some(entry) => {
                let entry = Entry {
                    expires_at: None,
                    ..entry
                };
                self.backfill_with(key, &entry, below, ticket, background)
                    .await;
                Fetched::from_entry(entry, Origin::Source)
            }
            None => {
                inner.source.misses.incr();
                if let Some(ttl) = inner.policy.negative_ttl {
                    let absent = Entry::absent(0).expiring_at(inner.clock.now() + ttl);
                    self.backfill_with(key, &absent, below, ticket, background)
                        .await;
                }
                Fetched::from_entry(Entry::absent(0), Origin::Source)
            }
        }
    }

    /// The source failed. If the failure is transient (unreachable, slow), serve a stale copy
    /// within the max-stale age, if any, else [`Error::SourceUnavailable`]. Other failures (a
    /// row that does not decode, a refused query) are returned as they are: they say something
    /// about the data, not about availability.
    async fn fail_safe(&self, key: &K, error: Error) -> Result<Fetched<V>> {
        let inner = &*self.inner;
        if !error.is_transient() {
            tracing::warn!(%error, "source failed");
            return Err(error);
        }
        if let Some(max_stale) = inner.policy.max_stale {
            for (i, level) in inner.tiers.iter().enumerate() {
                if level.repairs.blocks(key) {
                    continue;
                }
                if let Ok(Some(entry)) =
                    level.call_stale(level.tier.get_stale(key, max_stale)).await
                    && inner.floors.allows(key, entry.version, &inner.clock)
                {
                    tracing::debug!(tier = %level.name, %error, "source failed; serving stale copy");
                    return Ok(Fetched::from_entry(entry, Origin::Stale(i)));
                }
            }
        }
        tracing::warn!(%error, "source failed and no usable cached copy");
        Err(Error::SourceUnavailable {
            source: Box::new(error),
        })
    }

    /// Stores `entry` in cache tiers `0..below` (below the top one in a background task if
    /// `background`), unless the key changed in this chain since the load that read it began
    /// (`ticket`). Failures are counted and skipped.
    pub(super) async fn backfill_with(
        &self,
        key: &K,
        entry: &Entry<V>,
        below: usize,
        ticket: Ticket,
        background: bool,
    ) {
        if below == 0 {
            return;
        }
        if !self.inner.marks.admits(key, ticket, entry.version) {
            tracing::trace!("the key changed during the load; back-fill skipped");
            self.inner.counters.backfills_skipped.incr();
            return;
        }
        // The top tier (in-process, cheap) is always filled before the caller gets its answer.
        // The tiers below do not wait for its set: a fill must start when its load ends, so
        // that it lands within one tier's time limit (the grace after which an invalidation,
        // on any instance, makes its second pass), however long the set above it takes.
        if below == 1 {
            self.backfill_range(key, entry, 0..1, ticket).await;
        } else if background {
            let (this, key_owned, entry_owned) = (self.clone(), key.clone(), entry.clone());
            self.inner.tasks.spawn(async move {
                this.backfill_range(&key_owned, &entry_owned, 1..below, ticket)
                    .await;
            });
            self.backfill_range(key, entry, 0..1, ticket).await;
        } else {
            both(
                self.backfill_range(key, entry, 0..1, ticket),
                self.backfill_range(key, entry, 1..below, ticket),
            )
            .await;
        }
    }

    /// Fills `levels` with `entry`, top first, while nothing changes `key` (see
    /// [`fill`](Self::fill)).
    async fn backfill_range(
        &self,
        key: &K,
        entry: &Entry<V>,
        levels: std::ops::Range<usize>,
        ticket: Ticket,
    ) {
        for index in levels {
            if self.fill(index, key, entry, ticket).await == Filled::Refused {
                return;
            }
        }
    }

    /// Loads `keys` into the cache tiers ahead of demand, `batch` keys per
    /// [`get_many`](TieredCache::get_many) (one batch call per tier), every tier filled before
    /// it returns. Returns how many keys the source had.
    ///
    /// # Errors
    /// The first batch that fails; the batches before it stay loaded.
    pub async fn warm(&self, keys: &[K], batch: usize) -> Result<usize> {
        let mut found = 0;
        for chunk in keys.chunks(batch.max(1)) {
            found += self
                .get_many_with(chunk, false)
                .await?
                .iter()
                .filter(|v| v.is_some())
                .count();
        }
        Ok(found)
    }

    /// The values for `keys`, in order, answered tier by tier with one batch call per tier
    /// ([`CacheTier::get_many`](crate::CacheTier::get_many)). Batches are not coalesced with concurrent single gets.
    pub async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Arc<V>>>> {
        self.get_many_with(keys, self.inner.policy.background_backfill)
            .await
    }

    async fn get_many_with(&self, keys: &[K], background: bool) -> Result<Vec<Option<Arc<V>>>> {
        let inner = &*self.inner;
        let ticket = inner.marks.ticket();
        let mut answers: Vec<Option<Fetched<V>>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut failures = Vec::new();
        for (i, level) in inner.tiers.iter().enumerate() {
            if pending.is_empty() {
                break;
            }
            // Keys waiting for a replay here skip this tier.
            let (asked, mut still): (Vec<usize>, Vec<usize>) = pending
                .iter()
                .partition(|&&p| !level.repairs.blocks(&keys[p]));
            for _ in &still {
                level.misses.incr();
            }
            if asked.is_empty() {
                pending = still;
                continue;
            }
            let batch: Vec<K> = asked.iter().map(|&p| keys[p].clone()).collect();
            let Ok(found) = level.call("get_many", level.tier.get_many(&batch)).await else {
                pending = asked.into_iter().chain(still).collect();
                continue;
            };
            for (&p, found) in asked.iter().zip(found) {
                match self.usable(i, &keys[p], found) {
                    Some(entry) => {
                        self.backfill_with(&keys[p], &entry, i, ticket, background)
                            .await;
                        answers[p] = Some(Fetched::from_entry(entry, Origin::Tier(i)));
                    }
                    None => still.push(p),
                }
            }
            pending = still;
        }
        if !pending.is_empty() {
            let source = &inner.source;
            let batch: Vec<K> = pending.iter().map(|&p| keys[p].clone()).collect();
            inner.counters.source_loads.incr();
            match source.call("get_many", source.tier.get_many(&batch)).await {
                Ok(found) => {
                    for (&p, found) in pending.iter().zip(found) {
                        answers[p] = Some(self.sourced(&keys[p], found, ticket, background).await);
                    }
                }
                Err(error) => {
                    for &p in &pending {
                        match self.fail_safe(&keys[p], error.clone()).await {
                            Ok(stale) => answers[p] = Some(stale),
                            Err(error) => failures.push(error),
                        }
                    }
                }
            }
        }
        // Every key's outcome is counted, the failed ones too, before the first failure (if
        // any) is returned.
        let answers: Vec<Fetched<V>> = answers.into_iter().flatten().collect();
        for answer in &answers {
            self.count(&Ok(answer.clone()));
        }
        let failed = failures.len();
        if let Some(error) = failures.into_iter().next() {
            for _ in 0..failed {
                inner.counters.failed.incr();
            }
            return Err(error);
        }
        Ok(answers.into_iter().map(|f| f.value).collect())
    }
}

/// Runs both futures at once, `first` polled first each time; ends when both have.
async fn both(first: impl Future<Output = ()>, second: impl Future<Output = ()>) {
    let (mut first, mut second) = (std::pin::pin!(first), std::pin::pin!(second));
    let (mut first_done, mut second_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !first_done {
            first_done = first.as_mut().poll(cx).is_ready();
        }
        if !second_done {
            second_done = second.as_mut().poll(cx).is_ready();
        }
        if first_done && second_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
