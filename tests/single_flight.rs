//! Single-flight: concurrent misses of one key make one source load, and everyone gets its
//! result, a failure included.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Key, Val, key};
use tiercache_core::{Error, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Faulty, Gate, Op};

const CALLERS: usize = 1_000;

/// Memory, a fake Redis, and `db` behind a gate that holds the source's answer until the test
/// opens it, so that every caller is waiting when the load finishes.
fn chain(db: &FakeSource<Key, Val>, gate: &Gate) -> TieredCache<Key, Val> {
    let held = Faulty::new(db.clone());
    held.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    TieredCache::builder()
        .tier(MemoryTier::new())
        .tier(FakeTier::cache("redis"))
        .source_with_timeout(held, None)
        .build()
        .unwrap()
}

async fn stampede(
    cache: &TieredCache<Key, Val>,
    gate: &Gate,
) -> Vec<Result<Option<Arc<Val>>, Error>> {
    let mut tasks = Vec::with_capacity(CALLERS);
    for _ in 0..CALLERS {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move { cache.get(&key("hot")).await }));
    }
    gate.arrived(1).await;
    // Every caller is in the load (the one running it, held at the gate, and the waiters).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while cache.stats().load_callers < CALLERS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            cache.stats()
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.stats().loads_in_flight, 1);
    gate.open();
    let mut results = Vec::with_capacity(CALLERS);
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_gets_make_one_source_load() {
    let db = FakeSource::new("db");
    db.put(key("hot"), "value".to_string());
    let gate = Gate::new();
    let cache = chain(&db, &gate);

    let results = stampede(&cache, &gate).await;
    assert_eq!(db.calls().get, 1, "exactly one source load");
    let first = results[0].as_ref().unwrap().clone().unwrap();
    for r in &results {
        let v = r.as_ref().unwrap().as_ref().unwrap();
        assert!(Arc::ptr_eq(v, &first), "every caller shares one value");
    }
    let stats = cache.stats();
    assert_eq!(stats.source_loads, 1);
    assert_eq!(stats.coalesced, CALLERS as u64 - 1);
    assert_eq!(stats.requests, CALLERS as u64);
    assert_eq!(stats.source.hits, CALLERS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_is_shared_by_every_caller() {
    let db = FakeSource::new("db");
    db.faults().set_for(Op::Get, Fault::Error);
    let gate = Gate::new();
    let cache = chain(&db, &gate);

    let results = stampede(&cache, &gate).await;
    assert_eq!(db.calls().get, 1, "exactly one source load");
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, Error::SourceUnavailable { .. }), "{e:?}");
        assert!(e.is_transient());
    }
    assert_eq!(cache.stats().failed, CALLERS as u64);

    // The failure is not remembered: the next request loads again.
    db.faults().clear();
    db.put(key("hot"), "back".to_string());
    assert!(cache.get(&key("hot")).await.unwrap().is_some());
    assert_eq!(db.calls().get, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_single_flight_every_caller_loads() {
    let db = FakeSource::<Key, Val>::new("db");
    db.put(key("hot"), "value".to_string());
    let gate = Gate::new();
    let held = Faulty::new(db.clone());
    held.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    let cache: TieredCache<Key, Val> = TieredCache::builder()
        .tier(MemoryTier::new())
        .source_with_timeout(held, None)
        .single_flight(false)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move { cache.get(&key("hot")).await }));
    }
    gate.arrived(20).await;
    gate.open();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(db.calls().get, 20, "one load per caller");
    assert_eq!(cache.stats().coalesced, 0);
}
