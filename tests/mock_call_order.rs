//! Call-order facts, proven with mockall mocks: what the chain calls, in which order, and what
//! it never calls.

use std::sync::Arc;

use mockall::Sequence;
use mockall::predicate::eq;
use tiercache_core::{Entry, Origin, Peek, TieredCache};
use tiercache_testkit::MockCacheTier;

type Mock = MockCacheTier<String, String>;

fn named(name: &str) -> Mock {
    let mut m = Mock::new();
    m.expect_name().return_const(name.to_string());
    m
}

fn entry(v: &str, version: u64) -> Entry<String> {
    Entry::new(Arc::new(v.to_string()), version)
}

#[tokio::test]
async fn after_a_memory_hit_no_lower_tier_is_called() {
    let mut memory = named("memory");
    memory
        .expect_peek()
        .times(2)
        .returning(|_| Peek::Hit(entry("v", 1)));
    let mut redis = named("redis");
    redis.expect_get().never();
    redis.expect_set().never();
    redis.expect_peek().never();
    let mut db = named("db");
    db.expect_get().never();

    let cache = TieredCache::builder()
        .tier(memory)
        .tier(redis)
        .source(db)
        .build()
        .unwrap();
    assert_eq!(
        cache.fetch(&"k".to_string()).await.unwrap().origin,
        Origin::Tier(0)
    );
    assert!(cache.get(&"k".to_string()).await.unwrap().is_some());
}

#[tokio::test]
async fn a_hit_at_the_third_tier_back_fills_the_first_two_exactly_once() {
    let mut seq = Sequence::new();
    let mut l1 = named("l1");
    let mut l2 = named("l2");
    let mut l3 = named("l3");
    let mut db = named("db");
    let key = "k".to_string();

    l1.expect_peek()
        .with(eq(key.clone()))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Peek::Miss);
    l2.expect_get()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(None));
    l3.expect_get()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(entry("from l3", 7))));
    l1.expect_set()
        .withf(|k, e| k == "k" && e.version == 7)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    l2.expect_set()
        .withf(|k, e| k == "k" && e.version == 7)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    l3.expect_set().never();
    db.expect_get().never();

    let cache = TieredCache::builder()
        .tier(l1)
        .tier(l2)
        .tier(l3)
        .source(db)
        .build()
        .unwrap();
    let got = cache.fetch(&key).await.unwrap();
    assert_eq!((got.origin, got.version), (Origin::Tier(2), 7));
}

#[tokio::test]
async fn a_full_miss_asks_every_tier_once_then_the_source_then_fills_top_down() {
    let mut seq = Sequence::new();
    let mut l1 = named("l1");
    let mut l2 = named("l2");
    let mut db = named("db");
    l1.expect_peek()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Peek::Miss);
    l2.expect_get()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(None));
    db.expect_get()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(Some(entry("v", 3))));
    l1.expect_set()
        .withf(|_, e| e.version == 3 && e.expires_at.is_none())
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    l2.expect_set()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    let cache = TieredCache::builder()
        .tier(l1)
        .tier(l2)
        .source(db)
        .build()
        .unwrap();
    assert_eq!(
        cache.fetch(&"k".to_string()).await.unwrap().origin,
        Origin::Source
    );
}

#[tokio::test]
async fn update_writes_the_source_before_touching_any_cache() {
    let mut seq = Sequence::new();
    let mut l1 = named("l1");
    let mut l2 = named("l2");
    let mut db = named("db");
    db.expect_write()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(5));
    // Invalidate bottom-up at the previous version, then repopulate bottom-up.
    l2.expect_invalidate()
        .with(eq("k".to_string()), eq(Some(4)))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    l1.expect_invalidate()
        .with(eq("k".to_string()), eq(Some(4)))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    l2.expect_set()
        .withf(|_, e| e.version == 5)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    l1.expect_set()
        .withf(|_, e| e.version == 5)
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    let cache = TieredCache::builder()
        .tier(l1)
        .tier(l2)
        .source(db)
        .build()
        .unwrap();
    let v = cache
        .update(&"k".to_string(), Arc::new("new".to_string()))
        .await
        .unwrap();
    assert_eq!(v, 5);
}

#[tokio::test]
async fn a_failed_write_calls_no_cache_tier() {
    let mut l1 = named("l1");
    l1.expect_invalidate().never();
    l1.expect_set().never();
    let mut db = named("db");
    db.expect_write()
        .times(1)
        .returning(|_, _| Err(tiercache_core::Error::unsupported("db", "write")));
    let cache = TieredCache::builder().tier(l1).source(db).build().unwrap();
    assert!(
        cache
            .update(&"k".to_string(), Arc::new("new".to_string()))
            .await
            .is_err()
    );
}
