//! [`FakeTier`]: an in-memory cache tier that counts its calls and takes faults (the source's
//! fake is [`FakeSource`](crate::FakeSource)).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tiercache_core::{CacheTier, Clock, Entry, Key, Peek, Result, Slot, TierStats, Value, Version};

use crate::fault::{FaultSwitch, Op};

/// Default time to live of a fake cache tier.
pub const DEFAULT_FAKE_TTL: Duration = Duration::from_secs(300);

/// How many times each method of a [`FakeTier`] was called (faulty calls included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Calls {
    /// `peek` calls.
    pub peek: u64,
    /// `get` calls.
    pub get: u64,
    /// `get_many` calls.
    pub get_many: u64,
    /// `get_stale` calls.
    pub get_stale: u64,
    /// `set` calls.
    pub set: u64,
    /// `invalidate` calls.
    pub invalidate: u64,
    /// `clear` calls.
    pub clear: u64,
    /// `write` calls (a source's).
    pub write: u64,
    /// `delete` calls (a source's).
    pub delete: u64,
}

impl Calls {
    /// Lookups of any kind (`get`, `get_many`, `peek`).
    #[must_use]
    pub fn lookups(&self) -> u64 {
        self.get + self.get_many + self.peek
    }
}

#[derive(Default)]
struct CallCounters {
    peek: AtomicU64,
    get: AtomicU64,
    get_many: AtomicU64,
    get_stale: AtomicU64,
    set: AtomicU64,
    invalidate: AtomicU64,
    clear: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner<K, V> {
    name: String,
    ttl: Duration,
    tombstone_ttl: Duration,
    sync_peek: bool,
    clock: Clock,
    slots: Mutex<HashMap<K, Slot<V>>>,
    calls: CallCounters,
    faults: FaultSwitch,
}

/// An in-memory cache tier for tests, with the same version and tombstone rules as the memory
/// tier (no capacity limit). It counts every call and takes faults through
/// [`FakeTier::faults`].
///
/// Clones share everything, so keep a clone to inspect the tier you gave to a chain.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::TieredCache;
/// use tiercache_testkit::{FakeSource, FakeTier, Fault, Op};
///
/// let redis = FakeTier::<u32, String>::cache("redis");
/// let db = FakeSource::new("db");
/// db.put(1u32, "v1".to_string());
/// let cache = TieredCache::builder().tier(redis.clone()).source(db.clone()).build()?;
///
/// cache.get(&1).await?;
/// assert_eq!(redis.calls().set, 1); // back-filled
///
/// db.faults().set_for(Op::Write, Fault::Error);
/// assert!(cache.update(&1, Arc::new("v2".into())).await.is_err());
/// assert_eq!(redis.calls().invalidate, 0); // a failed write touches no cache
/// # Ok(())
/// # }
/// ```
pub struct FakeTier<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for FakeTier<K, V> {
    fn clone(&self) -> Self {
        FakeTier {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for FakeTier<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTier")
            .field("name", &self.inner.name)
            .field("faults", &self.inner.faults)
            .finish_non_exhaustive()
    }
}

impl<K: Key, V: Value> FakeTier<K, V> {
    /// A cache tier (entries live [`DEFAULT_FAKE_TTL`]; no synchronous `peek`, like a remote
    /// tier).
    #[must_use]
    pub fn cache(name: &str) -> Self {
        FakeTier {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                ttl: DEFAULT_FAKE_TTL,
                tombstone_ttl: DEFAULT_FAKE_TTL,
                sync_peek: false,
                clock: Clock::system(),
                slots: Mutex::new(HashMap::new()),
                calls: CallCounters::default(),
                faults: FaultSwitch::new(),
            }),
        }
    }

    fn configure(mut self, f: impl FnOnce(&mut Inner<K, V>)) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configure a FakeTier before cloning it");
        f(inner);
        self
    }

    /// Time to live of stored entries (and of tombstones).
    #[must_use]
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.configure(|i| {
            i.ttl = ttl;
            i.tombstone_ttl = ttl;
        })
    }

    /// The clock entries expire by (give the chain the same one).
    #[must_use]
    pub fn with_clock(self, clock: Clock) -> Self {
        self.configure(|i| i.clock = clock)
    }

    /// Uses `faults` as the fault switch (for example one made by
    /// [`FaultSwitch::with_seed`]).
    #[must_use]
    pub fn with_faults(self, faults: FaultSwitch) -> Self {
        self.configure(|i| i.faults = faults)
    }

    /// Answers the synchronous `peek` path, like an in-process tier.
    #[must_use]
    pub fn with_peek(self) -> Self {
        self.configure(|i| i.sync_peek = true)
    }

    /// The fault switch.
    #[must_use]
    pub fn faults(&self) -> &FaultSwitch {
        &self.inner.faults
    }

    /// The call counts so far.
    #[must_use]
    pub fn calls(&self) -> Calls {
        let c = &self.inner.calls;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Calls {
            peek: l(&c.peek),
            get: l(&c.get),
            get_many: l(&c.get_many),
            get_stale: l(&c.get_stale),
            set: l(&c.set),
            invalidate: l(&c.invalidate),
            clear: l(&c.clear),
            ..Calls::default()
        }
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<K, Slot<V>>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `value` behind the chain's back (no call is counted) at the next version above
    /// what the tier holds. Returns the version.
    pub fn put(&self, key: K, value: impl Into<Arc<V>>) -> Version {
        let now = self.inner.clock.now();
        let mut slots = self.slots();
        let version = slots.get(&key).and_then(|s| s.floor(now)).unwrap_or(0) + 1;
        let entry = Entry::new(value.into(), version).expiring_at(now + self.inner.ttl);
        slots.insert(key, Slot::Live(entry));
        version
    }

    /// Stores `entry` exactly as given, bypassing the version rules (to set up a test).
    pub fn put_entry(&self, key: K, entry: Entry<V>) {
        self.slots().insert(key, Slot::Live(entry));
    }

    /// The live entry held for `key` (fresh or expired), without counting a call.
    #[must_use]
    pub fn entry(&self, key: &K) -> Option<Entry<V>> {
        match self.slots().get(key) {
            Some(Slot::Live(e)) => Some(e.clone()),
            _ => None,
        }
    }

    /// The version of the live entry held for `key`.
    #[must_use]
    pub fn version(&self, key: &K) -> Option<Version> {
        self.entry(key).map(|e| e.version)
    }

    /// Keys held (live entries and tombstones).
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// Whether nothing is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, key: &K) -> Option<Entry<V>> {
        let now = self.inner.clock.now();
        let found = self.slots().get(key).and_then(|s| s.fresh(now)).cloned();
        bump(if found.is_some() {
            &self.inner.calls.hits
        } else {
            &self.inner.calls.misses
        });
        found
    }
}

#[async_trait]
impl<K: Key, V: Value> CacheTier<K, V> for FakeTier<K, V> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// An in-process fake ([`with_peek`](Self::with_peek)) is local; the others stand for
    /// shared tiers.
    fn is_local(&self) -> bool {
        self.inner.sync_peek
    }

    fn peek(&self, key: &K) -> Peek<V> {
        if !self.inner.sync_peek || self.inner.faults.is_active(Op::Get) {
            return Peek::Unsupported;
        }
        bump(&self.inner.calls.peek);
        match self.lookup(key) {
            Some(entry) => Peek::Hit(entry),
            None => Peek::Miss,
        }
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        bump(&self.inner.calls.get);
        self.inner
            .faults
            .run(&self.inner.name, Op::Get, async { Ok(self.lookup(key)) })
            .await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        bump(&self.inner.calls.get_many);
        self.inner
            .faults
            .run(&self.inner.name, Op::Get, async {
                Ok(keys.iter().map(|k| self.lookup(k)).collect())
            })
            .await
    }

    async fn get_stale(&self, key: &K, max_stale: Duration) -> Result<Option<Entry<V>>> {
        bump(&self.inner.calls.get_stale);
        self.inner
            .faults
            .run(&self.inner.name, Op::Get, async {
                let now = self.inner.clock.now();
                Ok(match self.slots().get(key) {
                    Some(Slot::Live(e))
                        if e.expires_at
                            .is_none_or(|at| now.saturating_since(at) <= max_stale) =>
                    {
                        Some(e.clone())
                    }
                    _ => None,
                })
            })
            .await
    }

    async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool> {
        bump(&self.inner.calls.set);
        self.inner
            .faults
            .run(&self.inner.name, Op::Set, async {
                let now = self.inner.clock.now();
                let expires_at = entry.capped_expiry(now, self.inner.ttl);
                if expires_at <= now {
                    return Ok(false);
                }
                let mut slots = self.slots();
                if slots
                    .get(key)
                    .is_some_and(|s| !s.admits(entry.version, now))
                {
                    return Ok(false);
                }
                slots.insert(key.clone(), Slot::Live(entry.expiring_at(expires_at)));
                Ok(true)
            })
            .await
    }

    async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()> {
        bump(&self.inner.calls.invalidate);
        self.inner
            .faults
            .run(&self.inner.name, Op::Invalidate, async {
                let now = self.inner.clock.now();
                let mut slots = self.slots();
                let old = slots.remove(key);
                if let Some(slot) = Slot::invalidated(old, version, now, self.inner.tombstone_ttl) {
                    slots.insert(key.clone(), slot);
                }
                Ok(())
            })
            .await
    }

    async fn clear(&self) -> Result<()> {
        bump(&self.inner.calls.clear);
        self.inner
            .faults
            .run(&self.inner.name, Op::Clear, async {
                self.slots().clear();
                Ok(())
            })
            .await
    }

    fn stats(&self) -> TierStats {
        let c = &self.inner.calls;
        let entries = self
            .slots()
            .values()
            .filter(|s| matches!(s, Slot::Live(_)))
            .count() as u64;
        TierStats::new(
            self.inner.name.clone(),
            c.hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
        )
        .with_size(entries, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiercache_core::ManualClock;

    #[tokio::test]
    async fn cache_applies_ttl_and_version_rules() {
        let manual = ManualClock::new();
        let t = FakeTier::<&str, u32>::cache("c")
            .with_ttl(Duration::from_secs(10))
            .with_clock(manual.clock());
        assert!(t.set(&"a", Entry::new(Arc::new(1), 2)).await.unwrap());
        assert!(!t.set(&"a", Entry::new(Arc::new(0), 1)).await.unwrap());
        manual.advance(Duration::from_secs(10));
        assert!(t.get(&"a").await.unwrap().is_none());
        assert!(
            t.get_stale(&"a", Duration::from_secs(1))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(t.stats().misses, 1);
    }
}
