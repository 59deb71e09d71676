//! Call-order facts, proven with mockall mocks: what the chain calls, in which order, and what
//! it never calls.

use std::sync::Arc;
use std::time::Duration;

use mockall::Sequence;
use mockall::predicate::eq;
use tiercache_core::{BreakerPolicy, Entry, Error, Origin, Peek, TierStats, TieredCache, Written};
use tiercache_testkit::{MockCacheTier, MockSource};

type Mock = MockCacheTier<String, String>;

fn named(name: &str) -> Mock {
    let mut m = Mock::new();
    m.expect_name().return_const(name.to_string());
    m
}

fn source(name: &str) -> MockSource<String, String> {
    let mut m = MockSource::new();
    m.expect_name().return_const(name.to_string());
    m.expect_follow().returning(|| None);
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
    let mut db = source("db");
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
    let mut db = source("db");
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
    let mut db = source("db");
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
    let mut db = source("db");
    db.expect_write()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _| Ok(Written::Changed(5)));
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
    let mut db = source("db");
    db.expect_write()
        .times(1)
        .returning(|_, _, _| Err(Error::backend("db", std::fmt::Error)));
    let cache = TieredCache::builder().tier(l1).source(db).build().unwrap();
    assert!(
        cache
            .update(&"k".to_string(), Arc::new("new".to_string()))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_conflict_or_an_unchanged_write_invalidates_nothing() {
    let mut l1 = named("l1");
    l1.expect_invalidate().never();
    l1.expect_invalidate_many().never();
    // The unchanged write fills the tier like a read does, at the stored version.
    l1.expect_set()
        .withf(|_, e| e.version == 3 && e.value.as_deref().map(String::as_str) == Some("same"))
        .times(1)
        .returning(|_, _| Ok(true));
    let mut db = source("db");
    db.expect_write()
        .with(
            eq("k".to_string()),
            mockall::predicate::always(),
            eq(Some(2)),
        )
        .times(1)
        .returning(|_, _, expected| {
            Err(Error::Conflict {
                tier: "db".into(),
                expected: expected.unwrap_or(0),
                current: 3,
            })
        });
    db.expect_write()
        .with(eq("k".to_string()), mockall::predicate::always(), eq(None))
        .times(1)
        .returning(|_, _, _| Ok(Written::Unchanged(3)));
    l1.expect_stats()
        .returning(|| TierStats::new("l1".to_string(), 0, 0));
    db.expect_stats()
        .returning(|| TierStats::new("db".to_string(), 0, 0));
    let cache = TieredCache::builder().tier(l1).source(db).build().unwrap();
    let key = "k".to_string();
    let err = cache
        .update_if(&key, 2, Arc::new("new".to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(3));
    let v = cache
        .update(&key, Arc::new("same".to_string()))
        .await
        .unwrap();
    assert_eq!(v, 3);
    let stats = cache.stats();
    assert_eq!((stats.updates, stats.unchanged_writes), (0, 1));
}

#[tokio::test]
async fn a_delete_goes_to_the_source_first_then_leaves_not_found_at_its_version() {
    let mut seq = Sequence::new();
    let mut l1 = named("l1");
    let mut db = source("db");
    db.expect_delete()
        .with(eq("k".to_string()), eq(None))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(Written::Changed(8)));
    l1.expect_invalidate()
        .with(eq("k".to_string()), eq(Some(7)))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    l1.expect_set()
        .withf(|_, e| e.version == 8 && e.is_absent() && e.expires_at.is_some())
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));
    let cache = TieredCache::builder().tier(l1).source(db).build().unwrap();
    assert_eq!(cache.delete(&"k".to_string()).await.unwrap(), 8);
}

/// A tier's `get_stale` that answers without asking its server (the default keeps no stale
/// copies: `Ok(None)`) says nothing about the tier. With the source down too, every read asks
/// each tier for a stale copy; a failing tier's breaker still opens after three failures, and
/// no read reaches it afterwards. (When that lookup counted as a success, the breaker of a down
/// Redis never opened while the database was down, and every read waited on Redis.)
#[tokio::test]
async fn a_stale_lookup_does_not_close_a_failing_tiers_breaker() {
    let down = |tier: &str| Error::unavailable(tier, std::io::Error::other("down"));
    let mut redis = named("redis");
    redis
        .expect_get()
        .times(3)
        .returning(move |_| Err(down("redis")));
    redis.expect_get_stale().returning(|_, _| Ok(None));
    redis
        .expect_stats()
        .returning(|| TierStats::new("redis".to_string(), 0, 0));
    let mut db = source("db");
    db.expect_get().returning(move |_| Err(down("db")));
    db.expect_stats()
        .returning(|| TierStats::new("db".to_string(), 0, 0));
    let cache = TieredCache::builder()
        .tier(tiercache_memory::MemoryTier::new())
        .tier(redis)
        .source(db)
        .breaker(BreakerPolicy {
            threshold: 3,
            cooldown: Duration::from_secs(600),
        })
        .max_stale(Some(Duration::from_secs(60)))
        .build()
        .unwrap();
    for i in 0..10 {
        let err = cache.get(&format!("k{i}")).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
    }
    let redis = &cache.stats().tiers[1];
    assert!(redis.breaker_open, "{redis:?}");
    // The seven later reads skipped Redis for their read and their stale lookup alike.
    assert_eq!((redis.errors, redis.skipped), (3, 15), "{redis:?}");
}
