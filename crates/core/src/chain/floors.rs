//! Version floors: after a write that could not reach every cache tier, older versions of
//! its key are refused at every tier until the floor dies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::clock::{Clock, Timestamp};
use crate::entry::Version;
use crate::tier::Key;

/// Versions this chain wrote that some cache tier may not have seen (its invalidation failed).
/// Until a floor dies, an older version of its key is treated as a miss at every tier.
pub(super) struct Floors<K> {
    map: Mutex<HashMap<K, (Version, Timestamp)>>,
    len: AtomicUsize,
}

impl<K: Key> Floors<K> {
    pub(super) fn new() -> Self {
        Floors {
            map: Mutex::new(HashMap::new()),
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
    pub(super) fn check(&self, key: &K, version: Version, clock: &Clock) -> bool {
        let now = clock.now();
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(key) {
            Some(&(floor, until)) if now < until => version >= floor,
            _ => true,
        }
    }

    pub(super) fn raise(&self, key: &K, version: Version, now: Timestamp, ttl: Duration) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, &mut (_, until)| now < until);
        let slot = map.entry(key.clone()).or_insert((version, now + ttl));
        if version >= slot.0 {
            *slot = (version, now + ttl);
        }
        self.len.store(map.len(), Ordering::Relaxed);
    }
}
