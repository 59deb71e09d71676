//! The in-process tier of tiercache: a sharded LRU ([`lru`]) with per-entry expiry, source
//! versions and tombstones.
//!
//! * Capacity defaults to [`DEFAULT_CAPACITY`] (500) entries, time to live to
//!   [`DEFAULT_TTL`] (5 minutes); an expired entry is never returned as fresh.
//! * The keys are spread over shards, each an LRU behind its own read-write lock. Eviction is
//!   least-recently-used within a shard; with one shard ([`MemoryTierBuilder::shards`]) it is
//!   LRU over the whole tier.
//! * A hit takes only the shard's read lock unless its entry is at risk of eviction: the shard is
//!   at least three-quarters full and the entry has drifted out of the front half of the
//!   shard's LRU list. Only then does it take the write lock to move the entry to the front.
//!   Hot entries are thus served without a write, and two cores do not fight over the list's
//!   pointers. The price: within the front half (or while the shard fills), order is insertion
//!   order, not use order. [`MemoryTierBuilder::exact_lru`] moves every hit to the front.
//! * Hit and miss counts are per-thread striped counters ([`Counter`]): no shared counter on
//!   the hot path.
//! * A hit answers through the synchronous [`CacheTier::peek`] path, so a chain's memory hit
//!   never allocates or awaits.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tiercache_core::{CacheTier, Entry};
//! use tiercache_memory::MemoryTier;
//!
//! let memory = MemoryTier::<String, String>::builder()
//!     .capacity(1_000)
//!     .ttl(Duration::from_secs(60))
//!     .build()?;
//! memory.set(&"alice".into(), Entry::new(Arc::new("dark".into()), 3)).await?;
//! let hit = memory.get(&"alice".into()).await?.expect("fresh");
//! assert_eq!(hit.version, 3);
//! assert_eq!(memory.stats().hits, 1);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use tiercache_core::{
    CacheTier, Clock, Counter, Entry, Error, Key, Peek, Result, Slot, TierStats, Timestamp, Value,
    Version,
};

/// Default capacity in entries (the seed design's `MEMORY_CACHE_MAX_SIZE`).
pub const DEFAULT_CAPACITY: usize = 500;
/// Default time to live (the seed design's `MEMORY_CACHE_TTL`, 5 minutes).
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Default tier name in stats and errors.
pub const DEFAULT_NAME: &str = "memory";
/// Smallest number of entries a shard gets when the shard count is chosen automatically.
const MIN_ENTRIES_PER_SHARD: usize = 32;

/// The in-process tier. See the [crate docs](crate).
pub struct MemoryTier<K, V> {
    shards: Box<[Shard<K, V>]>,
    mask: usize,
    hasher: foldhash::fast::RandomState,
    clock: Clock,
    config: Config,
    hits: Counter,
    misses: Counter,
}

#[derive(Debug, Clone)]
struct Config {
    name: String,
    capacity: usize,
    ttl: Duration,
    tombstone_ttl: Duration,
    jitter: f64,
}

/// One shard, alone on its cache lines.
#[repr(align(128))]
struct Shard<K, V> {
    state: RwLock<ShardState<K, V>>,
}

struct ShardState<K, V> {
    lru: LruCache<K, Held<V>>,
    /// Moves to the front so far: an entry whose `front` is within `window` of it is in the
    /// front part of the list (fewer than `window` entries were put before it since).
    moves: u64,
    /// How far from the front an entry may drift before a hit moves it back (0: always).
    window: u64,
    evictions: u64,
    rejected_sets: u64,
}

/// A slot and the value of its shard's `moves` when it was last put at the front.
struct Held<V> {
    slot: Slot<V>,
    front: u64,
}

impl<K: Key, V: Value> Shard<K, V> {
    fn new(capacity: NonZeroUsize, exact: bool) -> Self {
        let window = if exact { 0 } else { capacity.get() as u64 / 2 };
        Shard {
            state: RwLock::new(ShardState {
                lru: LruCache::new(capacity),
                moves: 0,
                window,
                evictions: 0,
                rejected_sets: 0,
            }),
        }
    }

    // A panic while holding the lock cannot leave the LRU half-updated in a way that matters
    // for a cache (at worst an entry is missing), so a poisoned lock keeps serving.

    #[inline]
    fn read(&self) -> RwLockReadGuard<'_, ShardState<K, V>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn write(&self) -> RwLockWriteGuard<'_, ShardState<K, V>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Key, V: Value> ShardState<K, V> {
    /// Whether a hit on an entry last put at the front at `front` may leave it where it is:
    /// while the shard is less than three-quarters full nothing is near eviction, and once it
    /// is, an entry in the front half is not either.
    #[inline]
    fn may_stay(&self, front: u64) -> bool {
        let len = self.lru.len() as u64;
        let cap = self.lru.cap().get() as u64;
        self.moves - front < self.window || (self.window > 0 && len < cap - cap / 4)
    }

    /// Inserts at the front, counting an eviction if the LRU pushed out another key.
    fn insert(&mut self, key: K, slot: Slot<V>) {
        self.moves += 1;
        let held = Held {
            slot,
            front: self.moves,
        };
        if let Some((old, _)) = self.lru.push(key.clone(), held)
            && old != key
        {
            self.evictions += 1;
        }
    }
}

impl<K: Key, V: Value> MemoryTier<K, V> {
    /// A tier with the defaults: 500 entries, 5 minutes, the system clock.
    #[must_use]
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default configuration is valid")
    }

    /// Starts configuring a tier.
    pub fn builder() -> MemoryTierBuilder<K, V> {
        MemoryTierBuilder::default()
    }

    #[inline]
    fn shard(&self, key: &K) -> &Shard<K, V> {
        // `mask` is `shards.len() - 1` and the length is a power of two.
        let index = (self.hasher.hash_one(key) as usize) & self.mask;
        &self.shards[index]
    }

    fn expiry_for(&self, entry: &Entry<V>, now: Timestamp) -> Timestamp {
        let ttl = tiercache_core::util::jittered_ttl(self.config.ttl, self.config.jitter);
        entry.capped_expiry(now, ttl)
    }

    /// The slow half of a hit: moves the entry to the front under the write lock.
    #[cold]
    fn promote(&self, shard: &Shard<K, V>, key: &K, now: Timestamp) -> Peek<V> {
        let mut state = shard.write();
        state.moves += 1;
        let moves = state.moves;
        let fresh = match state.lru.get_mut(key) {
            Some(held) => match &held.slot {
                Slot::Live(entry) if !entry.is_expired(now) => {
                    held.front = moves;
                    Some(entry.clone())
                }
                _ => None,
            },
            None => None,
        };
        drop(state);
        match fresh {
            Some(entry) => {
                self.hits.incr();
                Peek::Hit(entry)
            }
            None => {
                self.misses.incr();
                Peek::Miss
            }
        }
    }

    /// Entries held now (fresh, expired or tombstones).
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().lru.len()).sum()
    }

    /// Whether the tier holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Capacity in entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.config.capacity
    }

    /// Time to live of a stored entry.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// Number of shards.
    #[must_use]
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Removes every entry now (the synchronous form of [`CacheTier::clear`]). Hit and miss
    /// counts are kept.
    pub fn remove_all(&self) {
        for shard in &*self.shards {
            shard.write().lru.clear();
        }
    }

    /// Removes every entry at a version below `floor`, and every expired entry; returns how many
    /// were removed. (Used when invalidations may have been missed.)
    pub fn retain_newer(&self, floor: Version) -> usize {
        let now = self.clock.now();
        let mut removed = 0;
        for shard in &*self.shards {
            let mut state = shard.write();
            let doomed: Vec<K> = state
                .lru
                .iter()
                .filter(|(_, held)| match &held.slot {
                    Slot::Live(e) => e.version < floor || e.is_expired(now),
                    Slot::Tombstone { .. } => false,
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in doomed {
                state.lru.pop(&key);
                removed += 1;
            }
        }
        removed
    }
}

impl<K: Key, V: Value> Default for MemoryTier<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> fmt::Debug for MemoryTier<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTier")
            .field("config", &self.config)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<K: Key, V: Value> CacheTier<K, V> for MemoryTier<K, V> {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// In-process: only this instance fills it.
    fn is_local(&self) -> bool {
        true
    }

    #[inline]
    fn peek(&self, key: &K) -> Peek<V> {
        let now = self.clock.now();
        let shard = self.shard(key);
        {
            let state = shard.read();
            match state.lru.peek(key) {
                Some(Held {
                    slot: Slot::Live(entry),
                    front,
                }) if !entry.is_expired(now) => {
                    if state.may_stay(*front) {
                        let entry = entry.clone();
                        drop(state);
                        self.hits.incr();
                        return Peek::Hit(entry);
                    }
                }
                _ => {
                    drop(state);
                    self.misses.incr();
                    return Peek::Miss;
                }
            }
        }
        self.promote(shard, key, now)
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        Ok(match self.peek(key) {
            Peek::Hit(entry) => Some(entry),
            Peek::Miss | Peek::Unsupported => None,
        })
    }

    async fn get_stale(&self, key: &K, max_stale: Duration) -> Result<Option<Entry<V>>> {
        let now = self.clock.now();
        let state = self.shard(key).read();
        Ok(match state.lru.peek(key).map(|held| &held.slot) {
            Some(Slot::Live(entry))
                if entry
                    .expires_at
                    .is_none_or(|at| now.saturating_since(at) <= max_stale) =>
            {
                Some(entry.clone())
            }
            _ => None,
        })
    }

    async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool> {
        let now = self.clock.now();
        let expires_at = self.expiry_for(&entry, now);
        if expires_at <= now {
            return Ok(false);
        }
        let entry = entry.expiring_at(expires_at);
        let mut state = self.shard(key).write();
        if let Some(held) = state.lru.peek(key)
            && !held.slot.admits(entry.version, now)
        {
            state.rejected_sets += 1;
            return Ok(false);
        }
        state.insert(key.clone(), Slot::Live(entry));
        Ok(true)
    }

    async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()> {
        let now = self.clock.now();
        let mut state = self.shard(key).write();
        let old = state.lru.pop(key).map(|held| held.slot);
        if let Some(slot) = Slot::invalidated(old, version, now, self.config.tombstone_ttl) {
            state.insert(key.clone(), slot);
        }
        Ok(())
    }

    async fn clear(&self) -> Result<()> {
        self.remove_all();
        Ok(())
    }

    fn stats(&self) -> TierStats {
        let (mut entries, mut evictions, mut rejected) = (0, 0, 0);
        for shard in &*self.shards {
            let state = shard.read();
            entries += state.lru.len() as u64;
            evictions += state.evictions;
            rejected += state.rejected_sets;
        }
        TierStats::new(self.config.name.clone(), self.hits.get(), self.misses.get())
            .with_size(entries, Some(self.config.capacity as u64))
            .with_housekeeping(evictions, 0, rejected)
    }
}

/// Configures a [`MemoryTier`]; see [`MemoryTier::builder`].
#[must_use]
pub struct MemoryTierBuilder<K, V> {
    name: String,
    capacity: usize,
    ttl: Duration,
    tombstone_ttl: Option<Duration>,
    jitter: f64,
    shards: Option<usize>,
    exact_lru: bool,
    clock: Clock,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> fmt::Debug for MemoryTierBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTierBuilder")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl<K, V> Default for MemoryTierBuilder<K, V> {
    fn default() -> Self {
        MemoryTierBuilder {
            name: DEFAULT_NAME.to_owned(),
            capacity: DEFAULT_CAPACITY,
            ttl: DEFAULT_TTL,
            tombstone_ttl: None,
            jitter: 0.0,
            shards: None,
            exact_lru: false,
            clock: Clock::system(),
            _types: PhantomData,
        }
    }
}

impl<K: Key, V: Value> MemoryTierBuilder<K, V> {
    /// The tier's name in stats and errors. Defaults to `"memory"`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Maximum entries held (tombstones included). Defaults to [`DEFAULT_CAPACITY`].
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Time to live of a stored entry (capped by the entry's own remaining time). Defaults to
    /// [`DEFAULT_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an invalidation's tombstone refuses older versions. Defaults to the TTL.
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = Some(ttl);
        self
    }

    /// Shortens each entry's TTL by a random fraction up to `jitter` (in `[0, 1)`), so that
    /// entries filled together do not expire together. Defaults to 0.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Number of shards, a power of two no larger than the capacity. Defaults to four per
    /// available CPU, fewer when the capacity would leave a shard under 32 entries. One shard
    /// gives exact LRU order over the whole tier.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Moves every hit to the front of its shard's LRU list (exact LRU order, a write lock on
    /// every hit). By default a hit moves its entry only when the shard is three-quarters full
    /// and the entry has drifted out of the front half, and takes only the read lock otherwise.
    /// Defaults to `false`.
    pub fn exact_lru(mut self, exact: bool) -> Self {
        self.exact_lru = exact;
        self
    }

    /// The clock entries expire by. Defaults to [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the tier.
    ///
    /// # Errors
    /// [`Error::Config`] for a zero capacity or TTL, a jitter outside `[0, 1)`, or a shard
    /// count that is zero, not a power of two, or above the capacity.
    pub fn build(self) -> Result<MemoryTier<K, V>> {
        if self.capacity == 0 {
            return Err(Error::Config(
                "memory tier capacity must be at least 1".into(),
            ));
        }
        if self.ttl.is_zero() {
            return Err(Error::Config("memory tier ttl must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(Error::Config(format!(
                "memory tier jitter must be in [0, 1), got {}",
                self.jitter
            )));
        }
        let shards = match self.shards {
            Some(n) if n == 0 || !n.is_power_of_two() || n > self.capacity => {
                return Err(Error::Config(format!(
                    "memory tier shards must be a power of two between 1 and the capacity ({}), got {n}",
                    self.capacity
                )));
            }
            Some(n) => n,
            None => default_shards(self.capacity),
        };
        let shard_list: Vec<Shard<K, V>> = (0..shards)
            .map(|i| {
                // Spread the capacity exactly: the first `capacity % shards` get one more.
                let size = self.capacity / shards + usize::from(i < self.capacity % shards);
                Shard::new(
                    NonZeroUsize::new(size).expect("shards <= capacity"),
                    self.exact_lru,
                )
            })
            .collect();
        Ok(MemoryTier {
            shards: shard_list.into_boxed_slice(),
            mask: shards - 1,
            hasher: foldhash::fast::RandomState::default(),
            clock: self.clock,
            config: Config {
                name: self.name,
                capacity: self.capacity,
                ttl: self.ttl,
                tombstone_ttl: self.tombstone_ttl.unwrap_or(self.ttl),
                jitter: self.jitter,
            },
            hits: Counter::default(),
            misses: Counter::default(),
        })
    }
}

fn default_shards(capacity: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let wanted = (cpus * 4).next_power_of_two();
    let most = (capacity / MIN_ENTRIES_PER_SHARD).max(1);
    // The largest power of two not above `most`.
    let most = 1usize << (usize::BITS - 1 - most.leading_zeros());
    wanted.min(most)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tiercache_core::ManualClock;

    fn tier(capacity: usize, manual: &ManualClock) -> MemoryTier<String, u32> {
        MemoryTier::builder()
            .capacity(capacity)
            .shards(1)
            .exact_lru(true)
            .clock(manual.clock())
            .build()
            .unwrap()
    }

    /// Eight entries in one shard, hits moving entries only when they risk eviction.
    fn approximate_lru(manual: &ManualClock) -> MemoryTier<String, u32> {
        MemoryTier::builder()
            .capacity(8)
            .shards(1)
            .clock(manual.clock())
            .build()
            .unwrap()
    }

    fn entry(value: u32, version: Version) -> Entry<u32> {
        Entry::new(Arc::new(value), version)
    }

    fn key(k: &str) -> String {
        k.to_string()
    }

    #[tokio::test]
    async fn expired_entries_are_never_returned() {
        let manual = ManualClock::new();
        let t = tier(10, &manual);
        t.set(&key("a"), entry(1, 1)).await.unwrap();
        manual.advance(DEFAULT_TTL - Duration::from_nanos(1));
        assert!(t.get(&key("a")).await.unwrap().is_some());
        manual.advance(Duration::from_nanos(1));
        assert!(t.get(&key("a")).await.unwrap().is_none());
        assert!(matches!(t.peek(&key("a")), Peek::Miss));
        let s = t.stats();
        assert_eq!((s.hits, s.misses, s.total_requests), (1, 2, 3));
    }

    #[tokio::test]
    async fn ttl_is_capped_by_the_entry_s_remaining_time() {
        let manual = ManualClock::new();
        let t = tier(10, &manual);
        let short = entry(1, 1).expiring_at(manual.now() + Duration::from_secs(10));
        t.set(&key("a"), short).await.unwrap();
        let got = t.get(&key("a")).await.unwrap().unwrap();
        assert_eq!(got.remaining(manual.now()), Some(Duration::from_secs(10)));
        manual.advance(Duration::from_secs(10));
        assert!(t.get(&key("a")).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn least_recently_used_is_evicted_first() {
        let manual = ManualClock::new();
        let t = tier(2, &manual);
        t.set(&key("a"), entry(1, 1)).await.unwrap();
        t.set(&key("b"), entry(2, 1)).await.unwrap();
        // Touch "a", so "b" is the least recently used.
        assert!(t.get(&key("a")).await.unwrap().is_some());
        t.set(&key("c"), entry(3, 1)).await.unwrap();
        assert!(t.get(&key("b")).await.unwrap().is_none());
        assert!(t.get(&key("a")).await.unwrap().is_some());
        assert!(t.get(&key("c")).await.unwrap().is_some());
        let stats = t.stats();
        assert_eq!(
            (stats.evictions, stats.entries, stats.max_size),
            (1, Some(2), Some(2))
        );
        assert_eq!(t.len(), 2);
    }

    #[tokio::test]
    async fn hits_move_entries_only_when_they_risk_eviction() {
        let manual = ManualClock::new();
        let t = approximate_lru(&manual);
        for (i, k) in ["a", "b", "c", "d", "e", "f", "g", "h"].iter().enumerate() {
            t.set(&key(k), entry(i as u32, 1)).await.unwrap();
        }
        // "h" is the newest: in the front half, a hit leaves it where it is.
        // "a" is the oldest and the shard is full: a hit moves it to the front.
        assert!(t.get(&key("h")).await.unwrap().is_some());
        assert!(t.get(&key("a")).await.unwrap().is_some());
        t.set(&key("i"), entry(9, 1)).await.unwrap();
        assert!(t.get(&key("a")).await.unwrap().is_some(), "a was moved");
        assert!(
            t.get(&key("b")).await.unwrap().is_none(),
            "b was least recent"
        );
    }

    #[test]
    fn a_hit_leaves_an_entry_in_place_only_in_the_front_half_or_while_the_shard_fills() {
        let fill = |state: &mut ShardState<String, u32>, from: usize, to: usize| {
            for i in from..to {
                state.insert(format!("k{i}"), Slot::Live(entry(1, 1)));
            }
        };
        let capacity = NonZeroUsize::new(8).unwrap();
        let shard = Shard::<String, u32>::new(capacity, false);
        let mut state = shard.write();
        // Five of eight (less than three-quarters): every entry stays, the oldest too.
        fill(&mut state, 0, 5);
        assert!(state.may_stay(1));
        // Six of eight: only the front half stays (fewer than 4 puts since its own).
        fill(&mut state, 5, 6);
        assert_eq!(state.moves, 6);
        assert!(state.may_stay(3), "3 puts since");
        assert!(!state.may_stay(2), "4 puts since");
        // Exact LRU: every hit moves, even while the shard fills.
        let exact = Shard::<String, u32>::new(capacity, true);
        let mut state = exact.write();
        fill(&mut state, 0, 1);
        assert!(!state.may_stay(1));
    }

    #[tokio::test]
    async fn while_the_shard_fills_hits_do_not_reorder() {
        let manual = ManualClock::new();
        let t = approximate_lru(&manual);
        for k in ["a", "b", "c", "d", "e"] {
            t.set(&key(k), entry(1, 1)).await.unwrap();
        }
        // Five of eight: a hit on "a" does not move it, so it is still the first to go.
        assert!(t.get(&key("a")).await.unwrap().is_some());
        for k in ["f", "g", "h", "i"] {
            t.set(&key(k), entry(1, 1)).await.unwrap();
        }
        assert!(t.get(&key("a")).await.unwrap().is_none());
        assert!(t.get(&key("b")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn older_versions_never_replace_newer_ones() {
        let manual = ManualClock::new();
        let t = tier(10, &manual);
        assert!(t.set(&key("a"), entry(5, 5)).await.unwrap());
        assert!(!t.set(&key("a"), entry(4, 4)).await.unwrap());
        assert_eq!(*t.get(&key("a")).await.unwrap().unwrap().value.unwrap(), 5);
        assert!(t.set(&key("a"), entry(6, 6)).await.unwrap());
        assert_eq!(t.stats().rejected_sets, 1);
    }

    #[tokio::test]
    async fn tombstones_refuse_old_versions_until_they_die() {
        let manual = ManualClock::new();
        let t: MemoryTier<String, u32> = MemoryTier::builder()
            .shards(1)
            .tombstone_ttl(Duration::from_secs(30))
            .clock(manual.clock())
            .build()
            .unwrap();
        t.set(&key("a"), entry(1, 1)).await.unwrap();
        t.invalidate(&key("a"), Some(1)).await.unwrap();
        assert!(t.get(&key("a")).await.unwrap().is_none());
        assert!(!t.set(&key("a"), entry(1, 1)).await.unwrap());
        assert!(t.set(&key("a"), entry(2, 2)).await.unwrap());
        // Invalidating an older version leaves the newer entry.
        t.invalidate(&key("a"), Some(1)).await.unwrap();
        assert!(t.get(&key("a")).await.unwrap().is_some());
        // Let a tombstone die.
        t.invalidate(&key("a"), Some(2)).await.unwrap();
        assert!(!t.set(&key("a"), entry(2, 2)).await.unwrap());
        manual.advance(Duration::from_secs(30));
        assert!(t.set(&key("a"), entry(2, 2)).await.unwrap());
        // A manual invalidation refuses older versions; the same version may come back.
        t.invalidate(&key("a"), None).await.unwrap();
        assert!(t.get(&key("a")).await.unwrap().is_none());
        assert!(!t.set(&key("a"), entry(1, 1)).await.unwrap());
        assert!(t.set(&key("a"), entry(2, 2)).await.unwrap());
    }

    #[tokio::test]
    async fn stale_copies_are_kept_for_fail_safe() {
        let manual = ManualClock::new();
        let t = tier(10, &manual);
        t.set(&key("a"), entry(1, 1)).await.unwrap();
        manual.advance(DEFAULT_TTL + Duration::from_secs(60));
        assert!(t.get(&key("a")).await.unwrap().is_none());
        let max = Duration::from_secs(120);
        assert!(t.get_stale(&key("a"), max).await.unwrap().is_some());
        manual.advance(Duration::from_secs(61));
        assert!(t.get_stale(&key("a"), max).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn clear_and_retain_newer() {
        let manual = ManualClock::new();
        let t = tier(10, &manual);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            t.set(&key(k), entry(1, i as u64 + 1)).await.unwrap();
        }
        assert_eq!(t.retain_newer(2), 1);
        assert_eq!(t.len(), 2);
        // Below the floor goes; at and above it stays.
        assert!(t.get(&key("a")).await.unwrap().is_none());
        assert_eq!(t.get(&key("b")).await.unwrap().unwrap().version, 2);
        assert_eq!(t.get(&key("c")).await.unwrap().unwrap().version, 3);
        assert!(!t.is_empty());
        t.clear().await.unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn the_tier_reports_its_configuration_and_debug_shows_no_value() {
        let t: MemoryTier<String, u32> = MemoryTier::builder()
            .name("l1")
            .capacity(100)
            .ttl(Duration::from_secs(60))
            .build()
            .unwrap();
        assert_eq!(
            (t.name(), t.capacity(), t.ttl()),
            ("l1", 100, Duration::from_secs(60))
        );
        let builder = MemoryTier::<String, u32>::builder()
            .name("l1")
            .capacity(100);
        let text = format!("{builder:?}");
        assert!(
            text.starts_with("MemoryTierBuilder { name: \"l1\", capacity: 100, "),
            "{text}"
        );
        let text = format!("{t:?}");
        assert!(text.starts_with("MemoryTier { config: "), "{text}");
        assert!(
            text.contains("\"l1\"") && text.contains("capacity: 100"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hit_that_moves_an_entry_counts_as_a_move() {
        let manual = ManualClock::new();
        let t = approximate_lru(&manual);
        for i in 0..8 {
            t.set(&format!("k{i}"), entry(i, 1)).await.unwrap();
        }
        assert_eq!(t.shards[0].read().moves, 8);
        // The oldest of a full shard is moved to the front: one more move, and it is the front.
        assert!(t.get(&key("k0")).await.unwrap().is_some());
        let state = t.shards[0].read();
        assert_eq!(state.moves, 9);
        assert_eq!(state.lru.peek(&key("k0")).unwrap().front, 9);
    }

    #[test]
    fn bad_configuration_is_rejected() {
        let b = || MemoryTier::<String, u32>::builder();
        assert!(b().capacity(0).build().is_err());
        assert!(b().ttl(Duration::ZERO).build().is_err());
        assert!(b().jitter(1.0).build().is_err());
        assert!(b().shards(3).build().is_err());
        assert!(b().capacity(4).shards(8).build().is_err());
        let ok: MemoryTier<String, u32> = b().capacity(100).shards(4).build().unwrap();
        assert_eq!(ok.shard_count(), 4);
    }

    #[test]
    fn default_shards_keep_enough_entries_each() {
        assert_eq!(default_shards(1), 1);
        assert_eq!(default_shards(31), 1);
        assert!(default_shards(500) <= 500 / MIN_ENTRIES_PER_SHARD);
        // A large tier gets at least four shards per CPU, a power of two.
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let many = default_shards(100_000);
        assert!(
            many.is_power_of_two() && many >= 4 * cpus,
            "{many} for {cpus} CPUs"
        );
    }

    #[tokio::test]
    async fn capacity_is_split_exactly_over_shards() {
        let t: MemoryTier<u64, u64> = MemoryTier::builder()
            .capacity(500)
            .shards(8)
            .build()
            .unwrap();
        let total: usize = t.shards.iter().map(|s| s.read().lru.cap().get()).sum();
        assert_eq!(total, 500);
        for k in 0..10_000u64 {
            t.set(&k, Entry::new(Arc::new(k), 1)).await.unwrap();
        }
        assert!(t.len() <= 500);
        assert_eq!(t.stats().max_size, Some(500));
    }

    #[tokio::test]
    async fn jitter_only_shortens() {
        let manual = ManualClock::new();
        let t: MemoryTier<u64, u64> = MemoryTier::builder()
            .jitter(0.5)
            .clock(manual.clock())
            .build()
            .unwrap();
        let mut shortest = DEFAULT_TTL;
        for k in 0..200u64 {
            t.set(&k, Entry::new(Arc::new(k), 1)).await.unwrap();
            let e = t.get(&k).await.unwrap().unwrap();
            let left = e.remaining(manual.now()).unwrap();
            assert!(left <= DEFAULT_TTL && left >= DEFAULT_TTL / 2, "{left:?}");
            shortest = shortest.min(left);
        }
        // It does shorten: 200 draws all within the top tenth would be a 1 in 10^139 chance.
        assert!(shortest < DEFAULT_TTL * 9 / 10, "{shortest:?}");
    }

    #[test]
    fn is_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MemoryTier<String, String>>();
    }
}
