//! The staleness tracker: the latest version each user was updated to and when, so that a
//! read returning less than an update that had returned before it began counts as stale.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The latest version each user was updated to, and when the update returned, in shards so
/// that 32 tasks do not queue on one lock.
pub(super) struct Latest {
    shards: Vec<Mutex<HashMap<String, (u64, Instant)>>>,
    hasher: RandomState,
}

impl Latest {
    pub(super) fn new() -> Self {
        Latest {
            shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    pub(super) fn shard(
        &self,
        user: &str,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        let i = (self.hasher.hash_one(user) % self.shards.len() as u64) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn updated(&self, user: &str, version: u64, at: Instant) {
        let mut shard = self.shard(user);
        let slot = shard.entry(user.to_owned()).or_insert((version, at));
        if version >= slot.0 {
            *slot = (version, at);
        }
    }

    /// How stale a read of `version` that began at `began` and ended at `ended` was, if it
    /// returned less than an update that had returned before it began.
    pub(super) fn staleness(
        &self,
        user: &str,
        version: u64,
        began: Instant,
        ended: Instant,
    ) -> Option<Duration> {
        let shard = self.shard(user);
        match shard.get(user) {
            Some(&(latest, at)) if latest > version && at <= began => Some(ended - at),
            _ => None,
        }
    }
}
