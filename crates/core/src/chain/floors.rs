//! Version floors: after a write that could not reach every cache tier, older versions of its
//! key are refused at every tier until the floor dies.
//!
//! The hit path pays one relaxed load while no floor is alive. Floors all live the same time
//! (the chain's floor TTL plus its max-stale age), so the order they were raised in is the order
//! they die in: a queue in that order lets expired floors be dropped without walking the map,
//! and once the last one is gone the hit path is back to its one load.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::clock::{Clock, Timestamp};
use crate::entry::Version;
use crate::tier::Key;

/// Versions this chain wrote that some cache tier may not have seen (its invalidation failed).
/// Until a floor dies, an older version of its key is treated as a miss at every tier.
pub(super) struct Floors<K> {
    state: Mutex<State<K>>,
    /// Floors alive (or expired and not yet dropped); 0 lets the hit path skip the lock.
    len: AtomicUsize,
}

struct State<K> {
    map: HashMap<K, (Version, Timestamp)>,
    /// `(until, key)` in the order raised, which is the order of `until`: every floor lives
    /// the same time. A key raised again has a later entry; its earlier ones are skipped.
    queue: VecDeque<(Timestamp, K)>,
}

impl<K: Key> State<K> {
    /// Drops every floor dead at `now`.
    fn prune(&mut self, now: Timestamp) {
        while let Some((until, _)) = self.queue.front() {
            if now < *until {
                break;
            }
            let (until, key) = self.queue.pop_front().expect("front exists");
            if self.map.get(&key).is_some_and(|&(_, u)| u == until) {
                self.map.remove(&key);
            }
        }
    }
}

impl<K: Key> Floors<K> {
    pub(super) fn new() -> Self {
        Floors {
            state: Mutex::new(State {
                map: HashMap::new(),
                queue: VecDeque::new(),
            }),
            len: AtomicUsize::new(0),
        }
    }

    /// Whether `version` of `key` may be served now.
    #[inline(always)]
    pub(super) fn allows(&self, key: &K, version: Version, clock: &Clock) -> bool {
        // The common case, no failed writes outstanding, is one relaxed load.
        self.len.load(Ordering::Relaxed) == 0 || self.check(key, version, clock)
    }

    #[cold]
    fn check(&self, key: &K, version: Version, clock: &Clock) -> bool {
        let now = clock.now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.prune(now);
        self.len.store(state.map.len(), Ordering::Relaxed);
        match state.map.get(key) {
            Some(&(floor, until)) if now < until => version >= floor,
            _ => true,
        }
    }

    /// Refuses versions of `key` below `version` until `now + ttl`. `ttl` must be the same on
    /// every call (the queue relies on it).
    pub(super) fn raise(&self, key: &K, version: Version, now: Timestamp, ttl: Duration) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.prune(now);
        let until = now + ttl;
        let slot = state.map.entry(key.clone()).or_insert((version, until));
        if version >= slot.0 {
            *slot = (version, until);
            state.queue.push_back((until, key.clone()));
        }
        self.len.store(state.map.len(), Ordering::Relaxed);
    }

    /// Floors alive, or dead but not yet dropped (dropped at the next check or raise).
    /// Drops every floor (the source's history changed: its versions start over).
    pub(super) fn clear(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.map.clear();
        state.queue.clear();
        self.len.store(0, Ordering::Relaxed);
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_floor_refuses_older_versions_until_it_dies_then_costs_nothing() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let floors = Floors::<u32>::new();
        let ttl = Duration::from_secs(10);
        floors.raise(&1, 5, clock.now(), ttl);
        assert_eq!(floors.len(), 1);
        assert!(!floors.allows(&1, 4, &clock));
        assert!(floors.allows(&1, 5, &clock));
        assert!(floors.allows(&2, 1, &clock), "other keys are not floored");
        manual.advance(ttl);
        // The first check after the floor died drops it: back to the one-load path.
        assert!(floors.allows(&2, 1, &clock));
        assert_eq!(floors.len(), 0);
        assert!(floors.allows(&1, 4, &clock));
    }

    #[test]
    fn a_floor_raised_again_lives_from_its_last_raise() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let floors = Floors::<u32>::new();
        let ttl = Duration::from_secs(10);
        floors.raise(&1, 5, clock.now(), ttl);
        manual.advance(Duration::from_secs(6));
        floors.raise(&1, 6, clock.now(), ttl);
        floors.raise(&1, 3, clock.now(), ttl); // older: ignored
        manual.advance(Duration::from_secs(6));
        assert!(
            !floors.allows(&1, 5, &clock),
            "the second floor still lives"
        );
        assert_eq!(floors.len(), 1);
        manual.advance(Duration::from_secs(4));
        assert!(floors.allows(&1, 5, &clock));
        assert_eq!(floors.len(), 0);
    }

    #[test]
    fn raising_many_floors_drops_the_dead_ones_as_it_goes() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let floors = Floors::<u32>::new();
        let ttl = Duration::from_secs(1);
        for k in 0..10_000 {
            floors.raise(&k, 1, clock.now(), ttl);
            manual.advance(Duration::from_millis(1));
        }
        // Only the floors of the last second are alive.
        assert_eq!(floors.len(), 1000);
        let state = floors.state.lock().unwrap();
        assert_eq!(state.queue.len(), 1000);
    }
}
