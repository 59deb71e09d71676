//! The one door for remote changes: whatever brings a change this chain did not make itself
//! (the source's change feed, directly or relayed by the follower the source elected; another
//! instance's message on the backplane), the chain takes it here, with one set of rules.
//!
//! For every key changed, in this order:
//!
//! 1. The key is marked (with the change's version, or without one for a manual invalidation)
//!    and its load in flight is detached: loads running now fill nothing older, and no request
//!    that starts after this joins a load that began before it.
//! 2. **Shared tiers** (Redis), when the batch's scope is [`Scope::All`], bottom first: batch
//!    calls of 64 keys ([`CacheTier::invalidate_many`](crate::CacheTier::invalidate_many))
//!    drop every copy older than its change. A newer copy survives, so a late or repeated
//!    change is harmless. A tier that fails gets the batch remembered for replay, and its
//!    keys a floor. With [`Scope::Local`], a change another instance could not apply to the
//!    shared tiers (`shared_missed`) is remembered for replay here too: no read of this chain
//!    uses a shared tier for that key until its replay has succeeded.
//! 3. **Local tiers** (memory), bottom first, key by key: a tier that does not hold the key, or
//!    holds the change already, is left alone (only this process fills it, and the mark
//!    refuses older fills; a tombstone would only take the place of a hot entry). A copy held
//!    is replaced by the change's value when it came along, else dropped.
//! 4. A delete leaves "not found" at its version for the negative TTL where it dropped a copy.
//! 5. The key is marked once more (a fill that raced the steps above is refused afterwards).
//!
//! [`Change::Everything`] empties every cache tier in scope (a clear, with its second pass
//! for shared tiers); [`Change::Reset`] also forgets every version the chain knows of (marks,
//! floors, replays still to run): the source's history changed, and its next versions may be
//! below them.

use std::time::{Duration, SystemTime};

use super::TieredCache;
use super::marks::Ticket;
use super::steps::Filled;
use crate::entry::{Entry, Version};
use crate::feed::{Applied, Change, Changes, Scope, Via};
use crate::tier::{Key, Value};

/// Changes per call to a shared tier: one round trip each (Redis runs a script per key), small
/// enough to finish within the tier's time limit on a busy machine.
const SHARED_BATCH: usize = 64;

/// One key's change, as the door works on it.
struct Step<K, V> {
    key: K,
    version: Option<Version>,
    deleted: bool,
    value: Option<std::sync::Arc<V>>,
    shared_missed: bool,
    ticket: Ticket,
    /// Which cache tiers could not take it.
    missed: Vec<bool>,
    /// Which cache tiers dropped a copy (a delete fills "not found" there).
    reached: Vec<bool>,
}

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Applies a batch of remote changes: the one door through which the source's feed and
    /// the backplane hand a chain what it did not do itself (call it to replay a change you
    /// learned of otherwise). For every key, in this order:
    ///
    /// 1. The key is marked (with the change's version, or without one for a manual
    ///    invalidation) and its load in flight is detached: loads running now fill nothing
    ///    older, and no request that starts after this joins a load that began before it.
    /// 2. **Shared tiers**, with [`Scope::All`], bottom first: one
    ///    [`invalidate_many`](crate::CacheTier::invalidate_many) per tier drops every copy
    ///    older than its change (a newer copy survives: a late or repeated change is
    ///    harmless); a tier that fails gets it replayed later, and the key a floor. With
    ///    [`Scope::Local`], a change another instance could not apply there
    ///    ([`Change::missed_by_shared_tiers`]) is remembered for replay here too: no read of
    ///    this chain uses a shared tier for that key until its replay succeeded.
    /// 3. **Local tiers** (memory), bottom first: a tier that does not hold the key, or holds
    ///    the change already, is left alone (no tombstone takes a hot entry's place); a copy
    ///    held is replaced by the change's value when it came along, else dropped.
    /// 4. A delete leaves "not found" at its version for the negative TTL where it dropped a
    ///    copy.
    /// 5. The key is marked once more.
    ///
    /// [`Change::Everything`] empties every cache tier in scope. Returns, per change, whether
    /// a shared tier missed it.
    pub async fn apply(&self, changes: Changes<K, V>) -> Applied {
        let Changes {
            scope,
            via,
            changes,
        } = changes;
        let mut applied = Applied {
            shared_missed: Vec::with_capacity(changes.len()),
        };
        // Told to the observers once applied (see `observe.rs`).
        let observed = self.inner.observers.wanted().then(|| changes.clone());
        let mut run = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Everything | Change::Reset => {
                    let keys = std::mem::take(&mut run);
                    applied
                        .shared_missed
                        .extend(self.apply_keys(scope, via, keys).await);
                    if matches!(change, Change::Reset) {
                        self.forget_versions();
                    }
                    self.apply_everything(scope, via).await;
                    applied.shared_missed.push(false);
                }
                change => run.push(change),
            }
        }
        applied
            .shared_missed
            .extend(self.apply_keys(scope, via, run).await);
        for change in observed.into_iter().flatten() {
            self.inner.observers.send(change);
        }
        applied
    }

    /// Empties every tier this instance alone fills (memory), for when it may have missed
    /// changes (its backplane subscription dropped). Loads running now skip their back-fill.
    pub async fn flush_local(&self) {
        self.apply_everything(Scope::Local, Via::Backplane).await;
    }

    /// Forgets every version this chain knows of: the marks' versions, the floors, the
    /// invalidations still to replay (all of them of a history the source no longer has).
    fn forget_versions(&self) {
        let inner = &*self.inner;
        tracing::warn!("the source's history changed: forgetting every version known");
        inner.marks.forget_versions();
        inner.floors.clear();
        for level in &inner.tiers {
            level.repairs.forget();
        }
    }

    async fn apply_everything(&self, scope: Scope, via: Via) {
        let inner = &*self.inner;
        if via == Via::Feed {
            inner.counters.feed_flushes.incr();
        }
        inner.marks.mark_all();
        inner.flights.forget_all();
        match scope {
            Scope::All => {
                tracing::info!("every cached copy may be stale: emptying every cache tier");
                if let Err(error) = self.clear().await {
                    tracing::warn!(%error, "a cache tier could not be emptied");
                }
            }
            Scope::Local => {
                tracing::info!("changes may have been missed: emptying the local tiers");
                for index in 0..inner.tiers.len() {
                    if inner.tiers[index].tier.is_local() {
                        let _ = self.clear_pass(index).await;
                    }
                }
            }
        }
    }

    /// Steps 1 to 5 for a run of key changes; returns, for each, whether a shared tier missed
    /// it.
    async fn apply_keys(&self, scope: Scope, via: Via, changes: Vec<Change<K, V>>) -> Vec<bool> {
        if changes.is_empty() {
            return Vec::new();
        }
        let inner = &*self.inner;
        let levels = inner.tiers.len();
        let now = SystemTime::now();
        let mut steps = Vec::with_capacity(changes.len());
        for change in changes {
            let Change::Key {
                key,
                version,
                deleted,
                value,
                shared_missed,
                committed_at,
            } = change
            else {
                continue;
            };
            match via {
                Via::Feed => inner.counters.feed_changes.incr(),
                Via::Backplane => inner.counters.remote_invalidations.incr(),
            }
            if let Some(at) = committed_at {
                inner
                    .feed_lag
                    .record(now.duration_since(at).unwrap_or(Duration::ZERO));
            }
            let ticket = inner.marks.mark(&key, version);
            inner.flights.forget(&key);
            steps.push(Step {
                key,
                version,
                deleted,
                value,
                shared_missed,
                ticket,
                missed: vec![false; levels],
                reached: vec![false; levels],
            });
        }
        let negative = inner.policy.negative_ttl;
        // Where the tombstone sits: just below the change, so that the change itself can be
        // filled; at a delete itself when no "not found" will be filled; nowhere for a manual
        // invalidation (whatever is held goes).
        let dead = |step: &Step<K, V>| match step.version {
            Some(v) if step.deleted && negative.is_none() => Some(v),
            Some(v) => Some(v.saturating_sub(1)),
            None => None,
        };
        for index in (0..levels).rev() {
            let level = &inner.tiers[index];
            if level.tier.is_local() {
                for step in &mut steps {
                    self.apply_local(index, step, dead(step)).await;
                }
                continue;
            }
            match scope {
                Scope::All => {
                    // In calls small enough to finish within the tier's time limit (a page of
                    // the log is 500 changes).
                    for chunk in steps.chunks_mut(SHARED_BATCH) {
                        let batch: Vec<(K, Option<Version>)> =
                            chunk.iter().map(|s| (s.key.clone(), dead(s))).collect();
                        let done = level
                            .call("invalidate_many", level.tier.invalidate_many(&batch))
                            .await;
                        for (step, (key, at)) in chunk.iter_mut().zip(&batch) {
                            if done.is_ok() {
                                step.reached[index] = true;
                            } else {
                                step.missed[index] = true;
                                self.remember(index, key, *at);
                            }
                        }
                    }
                }
                Scope::Local => {
                    for step in steps.iter_mut().filter(|s| s.shared_missed) {
                        step.missed[index] = true;
                        self.remember(index, &step.key, dead(step));
                    }
                }
            }
        }
        for step in &steps {
            if let (true, Some(version), Some(ttl)) = (step.deleted, step.version, negative) {
                let absent = Entry::absent(version).expiring_at(inner.clock.now() + ttl);
                for index in (0..levels).rev().filter(|&i| step.reached[i]) {
                    if self.fill(index, &step.key, &absent, step.ticket).await == Filled::Refused {
                        break;
                    }
                }
            }
            if let Some(version) = step.version
                && step.missed.iter().any(|m| *m)
            {
                self.raise_floor(&step.key, version);
            }
            inner.marks.mark(&step.key, step.version);
        }
        steps
            .iter()
            .map(|step| {
                step.missed
                    .iter()
                    .enumerate()
                    .any(|(i, m)| *m && !inner.tiers[i].tier.is_local())
            })
            .collect()
    }

    /// Step 3 for one local tier: drop (or replace) a copy older than the change, if one is
    /// held.
    async fn apply_local(&self, index: usize, step: &mut Step<K, V>, dead: Option<Version>) {
        let level = &self.inner.tiers[index];
        let held = level
            .call_stale(level.tier.get_stale(&step.key, Duration::MAX))
            .await;
        match (&held, step.version) {
            // Not held: nothing to drop.
            (Ok(None), _) => return,
            // Holds the change already (a late or repeated message).
            (Ok(Some(entry)), Some(version)) if entry.version >= version => return,
            // Holds an older copy and the new value came along: replace it in place (a marked
            // fill: a newer change that overtook this one wins).
            (Ok(Some(_)), Some(version)) if step.value.is_some() => {
                let value = step.value.clone().expect("matched");
                let entry = Entry::new(value, version);
                if self.fill(index, &step.key, &entry, step.ticket).await == Filled::Stored {
                    return;
                }
            }
            // Older, or the tier cannot say: drop whatever is older than the change.
            _ => {}
        }
        if self.invalidate_at(index, &step.key, dead).await.is_err() {
            step.missed[index] = true;
        } else {
            step.reached[index] = true;
        }
    }
}
