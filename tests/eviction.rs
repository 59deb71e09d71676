//! The memory tier's LRU evicts tombstones and entries alike; the rule that keeps a slow reader
//! from putting an old version back must hold however much was evicted since the reader began.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Key, Val, key, val};
use tiercache_core::{CacheTier, Entry, Fetched, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeTier, Fault, Gate, Op};

/// A memory tier of two entries (one shard: exact LRU) over a source, no tier between.
struct Small {
    memory: Arc<MemoryTier<Key, Val>>,
    db: FakeTier<Key, Val>,
    cache: TieredCache<Key, Val>,
}

fn small_chain() -> Small {
    let memory = Arc::new(MemoryTier::builder().capacity(2).shards(1).build().unwrap());
    let db = FakeTier::source("db");
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
    db: &FakeTier<Key, Val>,
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
            .apply_remote_invalidation(&key(&format!("cold{other}")), Some(5), None)
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
        .apply_remote_invalidation(&key("a"), Some(2), None)
        .await;
    gate.open();
    reader.await.unwrap().unwrap();
    assert_eq!(held(&memory, "a").await, None, "version 1 not back-filled");
    db.faults().clear();
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}
