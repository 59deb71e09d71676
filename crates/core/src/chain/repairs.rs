//! The invalidations a level's tier missed, and their replay.
//!
//! **Missed invalidations** (the tier was down, slow or skipped when an update or an
//! invalidation reached it) are remembered per key and replayed by a task of the level's own,
//! off the request path, in batches
//! ([`CacheTier::invalidate_many`](crate::CacheTier::invalidate_many)), retried with a backoff
//! until the tier takes them. Until a key's replay has succeeded no read uses this tier for
//! that key: it could serve or copy up the version the replay is about to remove. Reads of
//! other keys go on as usual, so the first read after an outage costs what any read costs.
//! At most `max` keys are remembered; past that the tier is to be cleared instead (every read
//! skips it until the clear has succeeded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use super::Inner;
use super::level::Level;
use crate::entry::Version;
use crate::error::Result;
use crate::tier::{Key, Value};

/// Default most missed invalidations a level remembers before it clears the tier instead.
pub const DEFAULT_MAX_PENDING_REPAIRS: usize = 10_000;
/// Keys per replay call.
const REPLAY_BATCH: usize = 256;
/// First and longest wait between replays that fail (with up to 50% jitter).
const REPLAY_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(25), Duration::from_millis(200));

impl<K: Key, V: Value> Level<K, V> {
    /// Remembers that this tier missed an invalidation of `key` at `version`, and makes sure
    /// a task replays it.
    pub(super) fn remember(
        &self,
        key: &K,
        version: Option<Version>,
        chain: &Weak<Inner<K, V>>,
        index: usize,
    ) {
        if self.repairs.remember(key, version, &self.name) {
            let chain = chain.clone();
            tokio::spawn(replay(chain, index));
        }
    }

    /// Replays what this tier missed now, inline (its replay task does it anyway); stops at
    /// the first failure.
    pub(super) async fn replay_now(&self) -> Result<()> {
        while let Next::Job(job) = self.repairs.take(false) {
            self.run(job).await?;
        }
        Ok(())
    }

    /// Runs one replay job and records how it went. A caller that gives up part way (or a
    /// tier that panics) gives the job back as failed: its keys stay pending, not in flight
    /// for ever.
    async fn run(&self, job: Job<K>) -> Result<()> {
        let mut running = Running {
            repairs: &self.repairs,
            job: Some(job),
        };
        let result = match running.job.as_ref().expect("just set") {
            Job::Clear => self.call("clear", self.tier.clear()).await,
            Job::Batch(keys) => {
                self.call("invalidate_many", self.tier.invalidate_many(keys))
                    .await
            }
        };
        let job = running.job.take().expect("still held");
        if result.is_ok() && matches!(job, Job::Clear) {
            tracing::info!(tier = %self.name, "tier cleared: it had missed too many invalidations");
        }
        self.repairs.finish(job, result.is_ok());
        result
    }
}

/// A replay job being run; dropped before it was recorded (its caller gave up, the tier
/// panicked), it is recorded as failed.
struct Running<'a, K: Key> {
    repairs: &'a Repairs<K>,
    job: Option<Job<K>>,
}

impl<K: Key> Drop for Running<'_, K> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.repairs.finish(job, false);
        }
    }
}

/// Replays the invalidations cache tier `index` missed, until none is left or the chain is
/// gone. Holds the chain only while a call runs, never while it waits.
async fn replay<K: Key, V: Value>(chain: Weak<Inner<K, V>>, index: usize) {
    // Aborted or panicked: the next missed invalidation starts a new task.
    let mut exit = Exit {
        chain: chain.clone(),
        index,
        armed: true,
    };
    let Some(wake) = chain
        .upgrade()
        .map(|inner| Arc::clone(&inner.tiers[index].repairs.wake))
    else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let ok = {
            let Some(inner) = chain.upgrade() else { return };
            let level = &inner.tiers[index];
            match level.repairs.take(true) {
                Next::Job(job) => {
                    // A shared tier's copies may have been read by other instances before the
                    // replay (one started meanwhile knows nothing of what was missed): tell
                    // them, so that they drop what they copied.
                    let told = match (&job, level.tier.is_local()) {
                        (Job::Batch(keys), false) => keys.clone(),
                        _ => Vec::new(),
                    };
                    let ok = level.run(job).await.is_ok();
                    if ok {
                        let this = super::TieredCache {
                            inner: Arc::clone(&inner),
                        };
                        for (key, dead) in told {
                            this.publish(&key, dead.map(|v| v.saturating_add(1)), None)
                                .await;
                        }
                    }
                    ok
                }
                // Another replay (`TieredCache::repair`) holds the rest: wait for it.
                Next::Wait => false,
                Next::Done => {
                    exit.armed = false;
                    return;
                }
            }
        };
        if ok {
            failures = 0;
        } else {
            failures += 1;
            // The back-off, or sooner if the tier answers again meanwhile (another call to it
            // succeeded).
            let (sleep, woken) = (tokio::time::sleep(backoff(failures)), wake.notified());
            let (mut sleep, mut woken) = (std::pin::pin!(sleep), std::pin::pin!(woken));
            std::future::poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() || woken.as_mut().poll(cx).is_ready() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
        }
    }
}

/// Clears the level's `replaying` flag if its replay task ends other than by finding nothing
/// left (where `take` clears it).
struct Exit<K: Key, V: Value> {
    chain: Weak<Inner<K, V>>,
    index: usize,
    armed: bool,
}

impl<K: Key, V: Value> Drop for Exit<K, V> {
    fn drop(&mut self) {
        if self.armed
            && let Some(inner) = self.chain.upgrade()
        {
            inner.tiers[self.index].repairs.lock().replaying = false;
        }
    }
}

/// The wait after `failures` failed replays in a row: doubling from the first, capped, with up
/// to 50% off at random so that instances do not retry in step.
fn backoff(failures: u32) -> Duration {
    let (first, longest) = REPLAY_BACKOFF;
    crate::util::jittered_backoff(first, longest, failures)
}

/// The maps of keys checked on every read of a tier with replays pending: a fast hash (the
/// keys are the application's, not an attacker's choice of collisions across a network).
type Map<K, T> = HashMap<K, T, foldhash::fast::RandomState>;

/// What a replay does next.
pub(super) enum Job<K> {
    /// Clear the whole tier: it missed more than the bound.
    Clear,
    /// Invalidate these keys.
    Batch(Vec<(K, Option<Version>)>),
}

/// What [`Repairs::take`] found.
pub(super) enum Next<K> {
    /// A job to run.
    Job(Job<K>),
    /// Nothing to take now, but another replay's job is in flight and may come back.
    Wait,
    /// Nothing left (for the task: it ends).
    Done,
}

/// The invalidations a level missed. See the [module docs](self).
pub(super) struct Repairs<K> {
    state: Mutex<RepairState<K>>,
    /// Told when the tier answers again: the replay task stops waiting out its back-off.
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// Keys pending or in flight, plus one while a clear is wanted or running: 0 lets reads
    /// skip the lock.
    len: AtomicUsize,
    max: usize,
}

#[derive(Default)]
pub(super) struct RepairState<K> {
    pending: Map<K, Option<Version>>,
    /// Being replayed now.
    in_flight: Map<K, Option<Version>>,
    /// The tier missed more than the bound: it is to be cleared.
    clear_wanted: bool,
    clearing: bool,
    /// A replay task is running.
    pub(super) replaying: bool,
}

/// Two invalidations of one key as one: the higher version, or a manual one (`None`) if either
/// is.
fn merge(a: Option<Version>, b: Option<Version>) -> Option<Version> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

impl<K: Key> Repairs<K> {
    pub(super) fn new(max: usize) -> Self {
        Repairs {
            wake: Arc::default(),
            state: Mutex::new(RepairState {
                pending: Map::default(),
                in_flight: Map::default(),
                clear_wanted: false,
                clearing: false,
                replaying: false,
            }),
            len: AtomicUsize::new(0),
            max,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, RepairState<K>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_len(&self, state: &RepairState<K>) {
        let clear = usize::from(state.clear_wanted || state.clearing);
        self.len.store(
            state.pending.len() + state.in_flight.len() + clear,
            Ordering::Release,
        );
    }

    /// Keys waiting for a replay or being replayed (plus one while the tier is to be cleared).
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Forgets the invalidations still to replay (they are at versions of a history the source
    /// no longer has; the tier is being cleared anyway). One in flight finishes as it may.
    pub(super) fn forget(&self) {
        let mut state = self.lock();
        state.pending.clear();
        state.clear_wanted = false;
        self.publish_len(&state);
    }

    /// Whether a read of `key` must skip this tier: its replay is pending, or the whole tier
    /// is to be cleared.
    #[inline]
    pub(super) fn blocks(&self, key: &K) -> bool {
        self.len.load(Ordering::Acquire) != 0 && self.blocks_slow(key)
    }

    #[cold]
    fn blocks_slow(&self, key: &K) -> bool {
        let state = self.lock();
        state.clear_wanted
            || state.clearing
            || state.pending.contains_key(key)
            || state.in_flight.contains_key(key)
    }

    /// Records a missed invalidation; returns whether a replay task must be started.
    fn remember(&self, key: &K, version: Option<Version>, tier: &str) -> bool {
        let mut state = self.lock();
        if !state.clear_wanted || state.clearing {
            // (A clear still to come covers the key; one already running may not.)
            let slot = state.pending.entry(key.clone()).or_insert(version);
            *slot = merge(*slot, version);
            if state.pending.len() + state.in_flight.len() > self.max {
                tracing::warn!(
                    tier,
                    max = self.max,
                    "too many missed invalidations; the tier will be cleared"
                );
                state.pending.clear();
                state.clear_wanted = true;
            }
        }
        self.publish_len(&state);
        !std::mem::replace(&mut state.replaying, true)
    }

    /// The next replay job. When there is none, the replay task (`task`) waits while another
    /// replay's job is in flight (it may fail and come back), and otherwise ends.
    fn take(&self, task: bool) -> Next<K> {
        let mut state = self.lock();
        let next = if state.clear_wanted && !state.clearing {
            state.clear_wanted = false;
            state.clearing = true;
            // The clear covers them.
            state.pending.clear();
            Next::Job(Job::Clear)
        } else if !state.pending.is_empty() {
            let batch: Vec<(K, Option<Version>)> = {
                let keys: Vec<K> = state.pending.keys().take(REPLAY_BATCH).cloned().collect();
                keys.into_iter()
                    .map(|k| {
                        let v = state.pending.remove(&k).expect("listed");
                        (k, v)
                    })
                    .collect()
            };
            for (k, v) in &batch {
                state.in_flight.insert(k.clone(), *v);
            }
            Next::Job(Job::Batch(batch))
        } else if !state.in_flight.is_empty() || state.clearing {
            Next::Wait
        } else {
            if task {
                state.replaying = false;
            }
            Next::Done
        };
        self.publish_len(&state);
        next
    }

    /// Records how a job went: a failed batch goes back to pending, a failed clear is wanted
    /// again.
    fn finish(&self, job: Job<K>, ok: bool) {
        let mut state = self.lock();
        match job {
            Job::Clear => {
                state.clearing = false;
                state.clear_wanted |= !ok;
            }
            Job::Batch(keys) => {
                for (key, version) in keys {
                    state.in_flight.remove(&key);
                    if !ok && !state.clear_wanted {
                        let slot = state.pending.entry(key).or_insert(version);
                        *slot = merge(*slot, version);
                    }
                }
            }
        }
        self.publish_len(&state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay_all(repairs: &Repairs<u32>, ok: bool) -> usize {
        let mut jobs = 0;
        while let Next::Job(job) = repairs.take(true) {
            jobs += 1;
            repairs.finish(job, ok);
            if !ok {
                break;
            }
        }
        jobs
    }

    #[test]
    fn a_key_is_blocked_from_remembered_until_its_replay_succeeds() {
        let repairs = Repairs::<u32>::new(100);
        assert!(!repairs.blocks(&1));
        assert!(
            repairs.remember(&1, Some(3), "t"),
            "the first one starts a task"
        );
        assert!(!repairs.remember(&1, Some(5), "t"), "one task at a time");
        assert!(repairs.blocks(&1) && !repairs.blocks(&2));
        let Next::Job(Job::Batch(batch)) = repairs.take(true) else {
            panic!("a batch")
        };
        assert_eq!(batch, vec![(1, Some(5))], "merged to the higher version");
        assert!(repairs.blocks(&1), "blocked while in flight");
        repairs.finish(Job::Batch(batch), false);
        assert!(repairs.blocks(&1), "a failed replay stays pending");
        assert_eq!(replay_all(&repairs, true), 1);
        assert!(!repairs.blocks(&1));
        assert_eq!(repairs.len(), 0);
    }

    #[test]
    fn a_manual_invalidation_wins_a_merge() {
        let repairs = Repairs::<u32>::new(100);
        repairs.remember(&1, Some(3), "t");
        repairs.remember(&1, None, "t");
        let Next::Job(Job::Batch(batch)) = repairs.take(true) else {
            panic!("a batch")
        };
        assert_eq!(batch, vec![(1, None)]);
    }

    #[test]
    fn past_the_bound_the_tier_is_cleared_and_every_read_skips_it_until_then() {
        let repairs = Repairs::<u32>::new(10);
        for k in 0..10 {
            repairs.remember(&k, Some(1), "t");
        }
        assert!(!repairs.blocks(&999), "at the bound: no clear yet");
        repairs.remember(&10, Some(1), "t");
        assert!(repairs.blocks(&999), "every key is blocked");
        assert!(matches!(repairs.take(true), Next::Job(Job::Clear)));
        // A key missed while the clear runs is kept: the clear may have run before it.
        repairs.remember(&50, Some(1), "t");
        repairs.finish(Job::Clear, true);
        assert!(!repairs.blocks(&999));
        assert!(repairs.blocks(&50));
        assert_eq!(replay_all(&repairs, true), 1);
        assert_eq!(repairs.len(), 0);
    }

    #[test]
    fn keys_in_flight_count_towards_the_bound() {
        let repairs = Repairs::<u32>::new(3);
        repairs.remember(&1, Some(1), "t");
        repairs.remember(&2, Some(1), "t");
        let Next::Job(job) = repairs.take(true) else {
            panic!("a job")
        };
        repairs.remember(&3, Some(1), "t");
        assert!(
            !repairs.blocks(&999),
            "one pending and two in flight: at the bound"
        );
        repairs.remember(&4, Some(1), "t");
        assert!(
            repairs.blocks(&999),
            "two pending and two in flight: past it"
        );
        repairs.finish(job, true);
        assert!(matches!(repairs.take(true), Next::Job(Job::Clear)));
    }

    #[test]
    fn a_failed_clear_is_wanted_again() {
        let repairs = Repairs::<u32>::new(1);
        repairs.remember(&1, None, "t");
        repairs.remember(&2, None, "t");
        let Next::Job(job) = repairs.take(true) else {
            panic!("a job")
        };
        repairs.finish(job, false);
        assert!(repairs.blocks(&7));
        assert!(matches!(repairs.take(true), Next::Job(Job::Clear)));
    }

    #[test]
    fn a_job_dropped_before_it_is_recorded_goes_back_to_pending() {
        let repairs = Repairs::<u32>::new(100);
        repairs.remember(&1, Some(2), "t");
        let Next::Job(job) = repairs.take(false) else {
            panic!("a job")
        };
        // Another replay (the task) finds the job in flight: it waits rather than ends.
        assert!(matches!(repairs.take(true), Next::Wait));
        drop(Running {
            repairs: &repairs,
            job: Some(job),
        });
        assert!(repairs.blocks(&1), "still pending");
        assert!(matches!(repairs.take(true), Next::Job(Job::Batch(_))));
    }

    #[test]
    fn replays_go_in_batches() {
        let repairs = Repairs::<u32>::new(100_000);
        for k in 0..1000 {
            repairs.remember(&k, Some(1), "t");
        }
        assert_eq!(
            replay_all(&repairs, true),
            1000_usize.div_ceil(REPLAY_BATCH)
        );
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_with_jitter() {
        let (first, longest) = REPLAY_BACKOFF;
        assert!(backoff(1) <= first && backoff(1) >= first / 2);
        assert!(backoff(30) <= longest && backoff(30) >= longest / 2);
    }
}
