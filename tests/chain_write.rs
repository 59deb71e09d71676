//! The write path: source first, then invalidate and repopulate; the races that versions and
//! tombstones close; manual invalidation and clearing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Chain, Key, Val, key, val};
use tiercache_core::{CacheTier, Entry, Error, Origin, Source, TieredCache, Version, Written};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Faulty, Gate, Op};

#[tokio::test]
async fn update_writes_the_source_then_repopulates_every_tier() {
    let c = Chain::new();
    c.db.put(key("a"), "old".to_string());
    c.cache.get(&key("a")).await.unwrap();

    let v = c.cache.update(&key("a"), val("new")).await.unwrap();
    assert_eq!(v, 2);
    assert_eq!(c.db.version(&key("a")), Some(2));
    assert_eq!(c.memory_version("a").await, Some(2));
    assert_eq!(c.redis.version(&key("a")), Some(2));
    assert_eq!(c.redis.calls().invalidate, 1);

    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Tier(0)));
    assert_eq!(got.value.as_deref().map(String::as_str), Some("new"));
    assert_eq!(c.db.calls().get, 1, "no reload after an update");
}

#[tokio::test]
async fn a_failed_source_write_returns_the_error_and_touches_no_cache() {
    let c = Chain::new();
    c.db.put(key("a"), "old".to_string());
    c.cache.get(&key("a")).await.unwrap();
    let before = (c.redis.calls(), c.memory.stats());

    c.db.faults().set_for(Op::Write, Fault::Error);
    let err = c.cache.update(&key("a"), val("new")).await.unwrap_err();
    assert!(err.is_transient());
    assert_eq!(c.redis.calls(), before.0, "redis untouched");
    assert_eq!(c.memory_version("a").await, Some(1));
    assert_eq!(c.redis.version(&key("a")), Some(1));
    assert_eq!(c.db.version(&key("a")), Some(1));
    let got = c.cache.get(&key("a")).await.unwrap();
    assert_eq!(got.as_deref().map(String::as_str), Some("old"));
}

/// The race every read-through cache must close: a reader loads version 1 from the source, an
/// update writes version 2 and repopulates the caches, then the slow reader back-fills version
/// 1. The chain refuses it (the key changed since the load began), and so would the tiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_cannot_back_fill_an_older_version_after_an_update() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    let gate = Gate::new();
    c.db.faults().set_for(Op::Get, Fault::Hold(gate.clone()));

    let reader = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    gate.arrived(1).await; // the reader holds version 1
    let v2 = c.cache.update(&key("a"), val("v2")).await.unwrap();
    assert_eq!(v2, 2);
    gate.open();
    let slow = reader.await.unwrap().unwrap();
    assert_eq!(slow.version, 1, "the reader started before the update");

    // Its back-fill of version 1 was refused everywhere.
    assert_eq!(c.memory_version("a").await, Some(2));
    assert_eq!(c.redis.version(&key("a")), Some(2));
    assert_eq!(c.cache.fetch(&key("a")).await.unwrap().version, 2);
    assert_eq!(c.cache.stats().backfills_skipped, 1);
}

/// The same race one level up: the slow reader found version 1 in Redis. By the time its
/// answer arrives the chain knows of version 2, so it is not served either: the read goes on to
/// the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_second_tier_hit_cannot_back_fill_an_older_version_after_an_update() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.memory.remove_all();
    let gate = Gate::new();
    c.redis.faults().set_for(Op::Get, Fault::Hold(gate.clone()));

    let reader = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    gate.arrived(1).await;
    c.cache.update(&key("a"), val("v2")).await.unwrap();
    gate.open();
    let slow = reader.await.unwrap().unwrap();
    assert_eq!((slow.origin, slow.version), (Origin::Source, 2));
    assert_eq!(c.cache.stats().refused_stale_versions, 1);
    assert_eq!(c.memory_version("a").await, Some(2));
    assert_eq!(c.cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// A get that starts after `update` returned must not join a load that began before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_after_update_never_joins_an_older_load() {
    // A chain whose only cache tier is down, so every read goes to the source.
    let broken = FakeTier::<String, String>::cache("broken");
    broken.faults().set(Fault::Error);
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    let cache = TieredCache::builder()
        .tier(broken)
        .source(db.clone())
        .build()
        .unwrap();
    let gate = Gate::new();
    db.faults().set_for(Op::Get, Fault::Hold(gate.clone()));

    let early = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    gate.arrived(1).await;
    cache.update(&key("a"), val("v2")).await.unwrap();
    let late = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    // The late reader starts its own load, which reaches the source (a joiner never would).
    tokio::time::timeout(Duration::from_secs(5), gate.arrived(2))
        .await
        .expect("the late reader joined the early load");
    gate.open();
    assert_eq!(early.await.unwrap().unwrap().version, 1);
    assert_eq!(late.await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn a_tier_that_missed_an_update_is_not_read_for_that_key_until_its_replay() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();

    c.redis.faults().set(Fault::Error);
    c.cache.update(&key("a"), val("v2")).await.unwrap();
    assert_eq!(
        c.redis.version(&key("a")),
        Some(1),
        "redis missed the update"
    );
    assert_eq!(c.cache.stats().tiers[1].pending_repairs, 1);

    // Still down: a read skips redis for this key (not just because of the floor).
    c.memory.remove_all();
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Source));
    assert_eq!(c.cache.stats().refused_stale_versions, 0, "never asked");

    // Back: the replay runs in the background, with no read to trigger it.
    c.redis.faults().clear();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while c.cache.stats().tiers[1].pending_repairs > 0 {
        assert!(tokio::time::Instant::now() < deadline, "replayed in time");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(c.redis.version(&key("a")), None, "version 1 removed");
    let other = TieredCache::builder()
        .tier(c.redis.clone())
        .source(c.db.clone())
        .build()
        .unwrap();
    assert_eq!(other.fetch(&key("a")).await.unwrap().version, 2);
}

#[tokio::test]
async fn a_floor_refuses_the_old_copy_of_a_top_tier_that_missed_an_update() {
    let memory = Faulty::new(FakeTier::<String, String>::cache("memory").with_peek());
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    let cache = TieredCache::builder()
        .tier(memory.clone())
        .source(db.clone())
        .build()
        .unwrap();
    cache.get(&key("a")).await.unwrap();
    memory.faults().set_for(Op::Set, Fault::Error);
    memory.faults().set_for(Op::Invalidate, Fault::Error);
    cache.update(&key("a"), val("v2")).await.unwrap();
    memory.faults().clear();
    assert_eq!(
        memory.get_ref().version(&key("a")),
        Some(1),
        "memory missed it"
    );

    // The synchronous path finds version 1; the floor refuses it.
    let got = cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Source));
    assert_eq!(cache.stats().refused_stale_versions, 1);
}

#[tokio::test]
async fn manual_invalidation_empties_every_tier_and_the_next_read_reloads() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    // Someone edits the database directly.
    c.db.put(key("a"), "edited".to_string());

    c.cache.invalidate(&key("a")).await.unwrap();
    assert_eq!(c.memory_version("a").await, None);
    assert_eq!(c.redis.version(&key("a")), None);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_invalidation_stops_a_slow_reader_putting_back_what_it_read() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.memory.remove_all();
    let gate = Gate::new();
    c.redis.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    let reader = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    gate.arrived(1).await; // holds version 1 from redis
    c.db.put(key("a"), "edited".to_string());
    c.cache.invalidate(&key("a")).await.unwrap();
    gate.open();
    reader.await.unwrap().unwrap();
    assert_eq!(
        c.memory_version("a").await,
        None,
        "the load in flight skipped its back-fill"
    );
    c.redis.faults().clear();
    assert_eq!(c.cache.fetch(&key("a")).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_invalidation_goes_bottom_first_so_no_reader_copies_the_old_value_up() {
    // Memory wrapped so that its invalidation can be held at a gate: a reader runs between
    // the memory tier's invalidation and the next tier's.
    let memory = Faulty::new(Arc::new(tiercache_memory::MemoryTier::<Key, Val>::new()));
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let cache = TieredCache::builder()
        .tier_with_timeout(memory.clone(), None)
        .tier_with_timeout(redis.clone(), None)
        .source(db.clone())
        .build()
        .unwrap();
    db.put(key("a"), "v1".to_string());
    cache.get(&key("a")).await.unwrap(); // version 1 in memory and redis
    db.put(key("a"), "edited behind the cache's back".to_string());
    let gate = Gate::new();
    memory
        .faults()
        .set_for(Op::Invalidate, Fault::Hold(gate.clone()));
    let invalidation = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.invalidate(&key("a")).await })
    };
    gate.arrived(1).await; // memory invalidated, the invalidation held there
    memory.faults().clear();
    let read = cache.fetch(&key("a")).await.unwrap();
    gate.open();
    invalidation.await.unwrap().unwrap();
    assert_eq!(read.version, 2, "the reader got the edited version");
    assert_eq!(
        cache.fetch(&key("a")).await.unwrap().version,
        2,
        "no tier serves the version replaced behind the cache's back"
    );
}

#[tokio::test]
async fn clear_empties_the_caches_and_never_the_source() {
    let c = Chain::new();
    for k in ["a", "b"] {
        c.db.put(key(k), "v".to_string());
        c.cache.get(&key(k)).await.unwrap();
    }
    c.cache.clear_tier(0).await.unwrap();
    assert!(c.memory.is_empty());
    assert_eq!(c.redis.len(), 2);
    c.cache.clear().await.unwrap();
    assert!(c.redis.is_empty());
    assert_eq!(c.db.len(), 2);
    assert_eq!(c.db.calls().clear, 0);
    let err = c.cache.clear_tier(7).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)));
}

#[tokio::test]
async fn invalidate_and_clear_report_a_failing_tier_after_trying_all() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.redis.faults().set(Fault::Error);
    assert!(c.cache.invalidate(&key("a")).await.is_err());
    assert_eq!(
        c.memory_version("a").await,
        None,
        "memory was still invalidated"
    );
    assert!(c.cache.clear().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_leave_every_tier_at_the_source_version() {
    let c = Chain::new();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let cache = c.cache.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                cache
                    .update(&key("hot"), Arc::new(format!("{t}-{i}")))
                    .await
                    .unwrap();
                cache.get(&key("hot")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let source = c.db.version(&key("hot")).unwrap();
    assert_eq!(source, 400);
    assert_eq!(c.memory_version("hot").await, Some(source));
    assert_eq!(c.redis.version(&key("hot")), Some(source));
    assert_eq!(c.cache.stats().updates, 400);
}

/// Found by the model test: a clear leaves no tombstones, so another instance's fill that was
/// on its way when the clear ran (of a version a write has since replaced) landed in the
/// emptied tier and was served until its TTL. The clear's second pass removes it.
#[tokio::test(start_paused = true)]
async fn a_clear_removes_another_instances_fill_that_landed_after_it() {
    let shared = FakeTier::<Key, Val>::cache("redis");
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    let limit = Some(Duration::from_millis(50));
    let slow = Faulty::new(shared.clone());
    let b = TieredCache::builder()
        .shared_tier(Arc::new(slow.clone()), limit)
        .source(db.clone())
        .build()
        .unwrap();
    let a = TieredCache::builder()
        .shared_tier(Arc::new(shared.clone()), limit)
        .source(db.clone())
        .build()
        .unwrap();
    // B reads version 1; its fill of the shared tier takes 30 ms (within its 50 ms limit).
    slow.faults()
        .set_for(Op::Set, Fault::Delay(Duration::from_millis(30)));
    let reader = tokio::spawn(async move { b.fetch(&key("a")).await.map(|f| f.version) });
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Meanwhile A writes version 2, then clears every tier.
    assert_eq!(a.update(&key("a"), val("v2")).await.unwrap(), 2);
    a.clear().await.unwrap();
    assert_eq!(
        reader.await.unwrap().unwrap(),
        1,
        "B's read began before the write"
    );
    assert_eq!(
        shared.version(&key("a")),
        Some(1),
        "B's fill landed after the clear"
    );

    a.flush(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        shared.version(&key("a")),
        None,
        "the second pass removed it"
    );
    assert_eq!(a.fetch(&key("a")).await.unwrap().version, 2);
}

/// A request that starts after a clear does not join a load that began before it (and read
/// what the source held then): the clear detaches the loads in flight.
#[tokio::test(start_paused = true)]
async fn a_request_after_a_clear_does_not_join_a_load_begun_before_it() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    let gate = Gate::new();
    c.db.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    let early = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await.unwrap().version })
    };
    gate.arrived(1).await; // the early load has read version 1 and waits
    c.db.faults().clear();
    c.db.put(key("a"), "v2".to_string());
    c.cache.clear().await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(1), c.cache.fetch(&key("a")))
        .await
        .expect("the late request ran a load of its own")
        .unwrap();
    assert_eq!(late.version, 2);
    gate.open();
    assert_eq!(early.await.unwrap(), 1);
}

/// A local tier (memory) is cleared once: no other instance fills it, so no second pass wipes
/// what reads put back after the clear.
#[tokio::test(start_paused = true)]
async fn a_clear_of_the_memory_tier_makes_no_second_pass() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.cache.clear_tier(0).await.unwrap();
    assert_eq!(c.memory_version("a").await, None);
    c.cache.get(&key("a")).await.unwrap(); // copied up from redis
    c.cache.flush(Duration::from_secs(1)).await.unwrap();
    assert_eq!(c.memory_version("a").await, Some(1), "still held");
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(got.origin, Origin::Tier(0));
}

/// A source whose write panics (a bug in a team's own source).
#[derive(Clone)]
struct PanickingWrite(FakeSource<Key, Val>);

#[tiercache_core::async_trait]
impl Source<Key, Val> for PanickingWrite {
    fn name(&self) -> &str {
        "panicking-db"
    }
    async fn get(&self, key: &Key) -> tiercache_core::Result<Option<Entry<Val>>> {
        self.0.get(key).await
    }
    async fn write(
        &self,
        _key: &Key,
        _value: Arc<Val>,
        _expected: Option<Version>,
    ) -> tiercache_core::Result<Written> {
        panic!("the source's own bug");
    }
    async fn delete(
        &self,
        key: &Key,
        expected: Option<Version>,
    ) -> tiercache_core::Result<Written> {
        self.0.delete(key, expected).await
    }
    fn stats(&self) -> tiercache_core::TierStats {
        self.0.stats()
    }
}

/// An update runs in a task of the chain's (so that it finishes if its caller leaves); a panic
/// in it is the caller's panic, with its own message, not an error that hides the bug.
#[tokio::test]
async fn a_panic_in_an_update_reaches_its_caller_as_that_panic() {
    let cache: TieredCache<Key, Val> = TieredCache::builder()
        .tier(MemoryTier::new())
        .source(PanickingWrite(FakeSource::new("db")))
        .build()
        .unwrap();
    let caller = tokio::spawn(async move { cache.update(&key("a"), val("v1")).await });
    let panic = caller.await.unwrap_err().into_panic();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"the source's own bug"));
}
