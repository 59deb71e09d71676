//! The memory tier's LRU evicts tombstones and entries alike; the rule that keeps a slow reader
//! from putting an old version back must hold however much was evicted since the reader began.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Key, Val, key, val};
use tiercache_core::{CacheTier, Change, Changes, Entry, Fetched, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, Fault, Gate, Op};

/// A memory tier of two entries (one shard: exact LRU) over a source, no tier between.
struct Small {
    memory: Arc<MemoryTier<Key, Val>>,
    db: FakeSource<Key, Val>,
    cache: TieredCache<Key, Val>,
}

fn small_chain() -> Small {
    let memory = Arc::new(MemoryTier::builder().capacity(2).shards(1).build().unwrap());
    let db = FakeSource::new("db");
    let cache = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .source(db.clone())
        .build()
        .unwrap();
    Small { memory, db, cache }
}

async fn held(memory: &MemoryTier<Key, Val>, k: &str) -> Option<u64> {
    memory
        .get_stale(&key(k), Duration::MAX)
        .await
        .unwrap()
        .map(|e| e.version)
}

/// Stores version 1 of "a" and starts a reader that loads it from the database and is held
/// there, before its back-fill, until the gate opens.
async fn slow_reader(
    db: &FakeSource<Key, Val>,
    cache: &TieredCache<Key, Val>,
) -> (
    Gate,
    tokio::task::JoinHandle<tiercache_core::Result<Fetched<Val>>>,
) {
    db.put(key("a"), "v1".to_string());
    let gate = Gate::new();
    db.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    gate.arrived(1).await;
    (gate, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_cannot_put_back_an_old_version_after_the_update_was_evicted() {
    let Small { memory, db, cache } = small_chain();
    let (gate, reader) = slow_reader(&db, &cache).await;
    db.faults().clear();
    cache.update(&key("a"), val("v2")).await.unwrap();
    assert_eq!(held(&memory, "a").await, Some(2));
    // Two other keys push version 2 (and any tombstone) out of the LRU.
    for other in ["b", "c"] {
        memory
            .set(&key(other), Entry::new(val("x"), 1))
            .await
            .unwrap();
    }
    assert_eq!(held(&memory, "a").await, None, "evicted");
    gate.open();
    assert_eq!(reader.await.unwrap().unwrap().version, 1);
    assert_eq!(
        held(&memory, "a").await,
        None,
        "the slow reader's version 1 was not put back"
    );
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}

#[tokio::test]
async fn a_remote_invalidation_of_a_key_not_held_evicts_nothing() {
    let Small { memory, db, cache } = small_chain();
    for k in ["hot1", "hot2"] {
        db.put(key(k), "v".to_string());
        cache.get(&key(k)).await.unwrap();
    }
    assert_eq!(memory.len(), 2);
    for other in 0..10 {
        cache
            .apply(Changes::from_backplane(vec![Change::announced(
                key(&format!("cold{other}")),
                Some(5),
                None,
            )]))
            .await;
    }
    assert_eq!(held(&memory, "hot1").await, Some(1), "hot entry kept");
    assert_eq!(held(&memory, "hot2").await, Some(1), "hot entry kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_update_refuses_a_slow_readers_old_version_of_a_key_not_held() {
    let Small { memory, db, cache } = small_chain();
    let (gate, reader) = slow_reader(&db, &cache).await;
    // Another instance wrote version 2 and says so; this one holds nothing of "a".
    db.put(key("a"), "v2".to_string());
    cache
        .apply(Changes::from_backplane(vec![Change::announced(
            key("a"),
            Some(2),
            None,
        )]))
        .await;
    gate.open();
    reader.await.unwrap().unwrap();
    assert_eq!(held(&memory, "a").await, None, "version 1 not back-filled");
    db.faults().clear();
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// A tier whose sets of version 1 run in a task of their own and land `delay` later, whoever
/// waited: like a Redis command the chain gave up on that the server still runs. (Other sets
/// land at once.)
struct LateSet {
    inner: Arc<MemoryTier<Key, Val>>,
    delay: Duration,
}

#[tiercache_core::async_trait]
impl CacheTier<Key, Val> for LateSet {
    fn name(&self) -> &str {
        "late"
    }
    async fn get(&self, key: &Key) -> tiercache_core::Result<Option<Entry<Val>>> {
        self.inner.get(key).await
    }
    async fn set(&self, key: &Key, entry: Entry<Val>) -> tiercache_core::Result<bool> {
        if entry.version != 1 {
            return self.inner.set(key, entry).await;
        }
        let (inner, key, delay) = (self.inner.clone(), key.clone(), self.delay);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.set(&key, entry).await
        })
        .await
        .expect("the set ran")
    }
    async fn invalidate(
        &self,
        key: &Key,
        version: Option<tiercache_core::Version>,
    ) -> tiercache_core::Result<()> {
        self.inner.invalidate(key, version).await
    }
    async fn clear(&self) -> tiercache_core::Result<()> {
        self.inner.clear().await
    }
    fn stats(&self) -> tiercache_core::TierStats {
        self.inner.stats()
    }
}

#[tokio::test(start_paused = true)]
async fn a_fill_that_timed_out_and_landed_late_is_taken_back() {
    // The second tier holds one entry (evictions, like a Redis at maxmemory); its sets land
    // 30 ms after they were sent, the chain gives up on them after 10 ms.
    let lower = Arc::new(MemoryTier::builder().capacity(1).shards(1).build().unwrap());
    let db = FakeSource::<Key, Val>::new("db");
    let cache = TieredCache::builder()
        .tier_with_timeout(MemoryTier::<Key, Val>::new(), None)
        .tier_with_timeout(
            LateSet {
                inner: lower.clone(),
                delay: Duration::from_millis(30),
            },
            Some(Duration::from_millis(10)),
        )
        .source(db.clone())
        .build()
        .unwrap();
    db.put(key("a"), "v1".to_string());
    // A read fills version 1 into the second tier: the set is on its way.
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    // Meanwhile version 2 is written, and the second tier evicts it (and its tombstone).
    cache.update(&key("a"), val("v2")).await.unwrap();
    lower
        .set(&key("other"), Entry::new(val("x"), 1))
        .await
        .unwrap();
    assert_eq!(held(&lower, "a").await, None, "evicted");
    // The read's set of version 1 timed out in the chain at 10 ms, and lands at 30 ms.
    assert_eq!(reader.await.unwrap().unwrap().version, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_ne!(
        held(&lower, "a").await,
        Some(1),
        "the late fill of version 1 was taken back"
    );
}
