//! Rules no other test pinned down, each written so that it fails when its rule breaks: version
//! floors (what they guard, and when they die), the max-stale boundary, background back-fill
//! racing a write, batch reads and warming with a cache tier failing or hanging, and every
//! configuration error of the chain builder.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Chain, Key, Val, key, val};
use tiercache_core::{BreakerPolicy, CacheTier, Change, Changes, Error, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Faulty, Op};

/// The one case a floor alone covers: a tier that missed an update's invalidation is cleared
/// (too many missed), and then another instance's fill with no time limit lands in it, with the
/// version the update replaced. Repairs no longer block the tier and no tombstone is left; the
/// writer's floor refuses the copy.
#[tokio::test(start_paused = true)]
async fn a_floor_refuses_an_old_copy_put_back_after_a_tier_was_cleared_for_missed_invalidations() {
    let shared = FakeTier::<Key, Val>::cache("redis");
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    // B's fills have no time limit, and take 500 ms.
    let slow = Faulty::new(shared.clone());
    slow.faults()
        .set_for(Op::Set, Fault::Delay(Duration::from_millis(500)));
    let b = TieredCache::builder()
        .shared_tier(Arc::new(slow), None)
        .source(db.clone())
        .build()
        .unwrap();
    let a = TieredCache::builder()
        .tier_with_timeout(shared.clone(), Some(Duration::from_millis(20)))
        .source(db.clone())
        .breaker(BreakerPolicy::never())
        .max_pending_repairs(1)
        .build()
        .unwrap();
    let reader = tokio::spawn(async move { b.fetch(&key("a")).await.unwrap().version });
    tokio::time::sleep(Duration::from_millis(1)).await;
    // A writes two keys while the shared tier fails: one more missed than the bound.
    shared.faults().set(Fault::Error);
    assert_eq!(a.update(&key("a"), val("v2")).await.unwrap(), 2);
    a.update(&key("b"), val("b1")).await.unwrap();
    shared.faults().clear();
    a.flush(Duration::from_secs(1)).await.unwrap();
    assert!(shared.calls().clear >= 1, "the tier was cleared");
    assert_eq!(reader.await.unwrap(), 1, "B read before the write");
    assert_eq!(
        shared.version(&key("a")),
        Some(1),
        "B's fill landed after the clear"
    );

    let got = a.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Source));
    assert_eq!(a.stats().refused_stale_versions, 1);

    // The batch read is guarded the same way: version 1 put back again is refused.
    shared.put_entry(key("a"), tiercache_core::Entry::new(val("v1"), 1));
    let got = a.get_many(&[key("a")]).await.unwrap();
    assert_eq!(got[0].as_deref().map(String::as_str), Some("v2"));
    assert_eq!(a.stats().refused_stale_versions, 2);
}

/// A floor lives the floor TTL plus the max-stale age (a stale copy may be served that long
/// past its expiry), and not longer.
#[tokio::test]
async fn a_floor_dies_after_the_floor_ttl_plus_the_max_stale_age() {
    let c = Chain::with(|b| {
        b.breaker(BreakerPolicy::never())
            .floor_ttl(Duration::from_secs(60))
            .max_stale(Some(Duration::from_secs(30)))
    });
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.redis.faults().set_for(Op::Invalidate, Fault::Error);
    c.cache.update(&key("a"), val("v2")).await.unwrap();
    c.redis.faults().clear();
    assert_eq!(c.cache.stats().floors, 1, "the update missed redis");

    c.manual.advance(Duration::from_secs(89));
    c.cache.get(&key("a")).await.unwrap();
    assert_eq!(c.cache.stats().floors, 1, "alive at 89 s");
    c.manual.advance(Duration::from_secs(2));
    c.cache.get(&key("a")).await.unwrap();
    assert_eq!(c.cache.stats().floors, 0, "dead at 91 s");
}

/// A stale copy is served while the source fails up to exactly the max-stale age past its
/// expiry, and not a moment later (the memory tier's rule).
#[tokio::test]
async fn a_stale_copy_is_served_up_to_exactly_the_max_stale_age() {
    let c = Chain::with(|b| b.max_stale(Some(Duration::from_secs(60))));
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    // Only memory holds it; its copy expired 60 s ago.
    c.redis.clear().await.unwrap();
    c.db.faults().set(Fault::Error);
    c.manual
        .advance(support::MEMORY_TTL + Duration::from_secs(60));
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (1, Origin::Stale(0)));
    c.manual.advance(Duration::from_nanos(1));
    let err = c.cache.fetch(&key("a")).await.unwrap_err();
    assert!(matches!(err, Error::SourceUnavailable { .. }), "{err}");
}

type Cache = TieredCache<Key, Val>;
/// A Redis-like tier whose calls can be delayed.
type SlowRedis = Faulty<FakeTier<Key, Val>>;

/// A chain whose lower tier's sets can be delayed, filling it in the background.
fn background_chain() -> (Cache, SlowRedis, FakeSource<Key, Val>) {
    let redis = Faulty::new(FakeTier::<Key, Val>::cache("redis"));
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    let cache = TieredCache::builder()
        .tier(MemoryTier::new())
        .tier_with_timeout(redis.clone(), Some(Duration::from_millis(500)))
        .source(db.clone())
        .background_backfill(true)
        .build()
        .unwrap();
    (cache, redis, db)
}

/// Reads version 1 with its background fill of redis landing 100 ms later.
async fn read_with_a_late_fill(cache: &Cache, redis: &SlowRedis) {
    redis
        .faults()
        .set_for(Op::Set, Fault::Delay(Duration::from_millis(100)));
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 1);
    // The background fill has started (and drawn its delay).
    tokio::time::sleep(Duration::from_millis(1)).await;
    redis.faults().clear();
}

/// A background back-fill of the version a write replaced, landing after the write, does not
/// put it back: the lower tier ends with the new version.
#[tokio::test(start_paused = true)]
async fn a_background_fill_that_lands_after_a_write_does_not_put_back_the_old_version() {
    let (cache, redis, _db) = background_chain();
    read_with_a_late_fill(&cache, &redis).await;
    assert_eq!(cache.update(&key("a"), val("v2")).await.unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(redis.get_ref().version(&key("a")), Some(2));
    cache.clear_tier(0).await.unwrap();
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// A background back-fill whose load began before a manual invalidation, landing after it, is
/// taken back at once (not left for the invalidation's second pass).
#[tokio::test(start_paused = true)]
async fn a_background_fill_that_lands_after_an_invalidation_is_taken_back_at_once() {
    let (cache, redis, db) = background_chain();
    read_with_a_late_fill(&cache, &redis).await;
    db.put(key("a"), "edited".to_string());
    cache.invalidate(&key("a")).await.unwrap();
    // The fill lands at 100 ms; the second pass would come at 500 ms.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(redis.get_ref().version(&key("a")), None, "taken back");
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// `get_many` and `warm` answer from the source when a cache tier fails or hangs, within the
/// tier's time limit, and count the failure.
#[tokio::test(start_paused = true)]
async fn get_many_and_warm_go_around_a_failing_or_hanging_tier() {
    for fault in [Fault::Error, Fault::Hang] {
        let redis = FakeTier::<Key, Val>::cache("redis");
        let db = FakeSource::new("db");
        db.put(key("a"), "a1".to_string());
        db.put(key("b"), "b1".to_string());
        let limit = Duration::from_millis(50);
        let cache = TieredCache::builder()
            .tier(MemoryTier::new())
            .tier_with_timeout(redis.clone(), Some(limit))
            .source(db.clone())
            .breaker(BreakerPolicy::never())
            .build()
            .unwrap();
        redis.faults().set(fault.clone());
        let started = tokio::time::Instant::now();
        let got = cache
            .get_many(&[key("a"), key("b"), key("c")])
            .await
            .unwrap();
        let values: Vec<_> = got.iter().map(|v| v.as_deref().cloned()).collect();
        assert_eq!(
            values,
            [Some("a1".to_string()), Some("b1".to_string()), None],
            "{fault:?}"
        );
        // Each call to the tier within its limit: one batch read, then a fill per key (with
        // breakers off, as here, each fill pays the limit; a breaker stops that after three).
        assert!(
            started.elapsed() <= 4 * limit,
            "{fault:?}: {:?}",
            started.elapsed()
        );
        let stats = cache.stats();
        let failed = stats.tiers[1].errors + stats.tiers[1].timeouts;
        assert!(failed > 0, "{fault:?}: the failure is counted");

        cache.clear_tier(0).await.unwrap();
        assert_eq!(cache.warm(&[key("a"), key("b")], 1).await.unwrap(), 2);
        // The warmed keys are in memory: the next reads ask no one else.
        let before = db.calls().get + db.calls().get_many;
        cache.get(&key("a")).await.unwrap();
        assert_eq!(db.calls().get + db.calls().get_many, before, "{fault:?}");
    }
}

#[test]
fn every_configuration_error_of_the_builder_is_a_typed_error_before_any_io() {
    let db = || FakeSource::<Key, Val>::new("db");
    let cases: Vec<(&str, Result<Cache, Error>)> = vec![
        (
            "no source",
            TieredCache::builder().tier(MemoryTier::new()).build(),
        ),
        (
            "zero source limit",
            TieredCache::builder()
                .source_with_timeout(db(), Some(Duration::ZERO))
                .build(),
        ),
        (
            "zero tier limit",
            TieredCache::builder()
                .tier_with_timeout(MemoryTier::new(), Some(Duration::ZERO))
                .source(db())
                .build(),
        ),
        (
            "zero negative TTL",
            TieredCache::builder()
                .source(db())
                .negative_ttl(Some(Duration::ZERO))
                .build(),
        ),
        (
            "zero floor TTL",
            TieredCache::builder()
                .source(db())
                .floor_ttl(Duration::ZERO)
                .build(),
        ),
        (
            "no pending repairs",
            TieredCache::builder()
                .source(db())
                .max_pending_repairs(0)
                .build(),
        ),
    ];
    for (what, built) in cases {
        match built {
            Err(Error::Config(message)) => assert!(!message.is_empty(), "{what}"),
            Err(other) => panic!("{what}: {other}"),
            Ok(_) => panic!("{what}: built"),
        }
    }
    // And the same settings with positive values build.
    TieredCache::<Key, Val>::builder()
        .tier_with_timeout(MemoryTier::new(), Some(Duration::from_millis(1)))
        .source_with_timeout(db(), Some(Duration::from_millis(1)))
        .negative_ttl(Some(Duration::from_secs(1)))
        .floor_ttl(Duration::from_secs(1))
        .max_pending_repairs(1)
        .build()
        .unwrap();
    // (No I/O: the fake source was never called.)
    let source = db();
    let _ = TieredCache::<Key, Val>::builder()
        .source(source.clone())
        .max_pending_repairs(0)
        .build();
    assert_eq!(source.calls().lookups(), 0);
}

/// Another instance's update that carries its value replaces the copy held here (the next
/// read is a memory hit of the new version); if the replacement cannot be stored, the old copy
/// is dropped all the same.
#[tokio::test]
async fn a_remote_update_replaces_the_held_copy_or_drops_it() {
    let memory = Arc::new(Faulty::new(MemoryTier::<Key, Val>::new()));
    let db = FakeSource::new("db");
    db.put(key("a"), "v1".to_string());
    let cache = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .source(db.clone())
        .build()
        .unwrap();
    cache.get(&key("a")).await.unwrap();
    cache
        .apply(Changes::from_backplane(vec![Change::announced(
            key("a"),
            Some(2),
            Some(val("v2")),
        )]))
        .await;
    let held = memory.get_ref().get(&key("a")).await.unwrap().unwrap();
    assert_eq!(held.version, 2, "replaced, not dropped");

    // The replacement of version 3 fails to store: version 2 must not stay.
    memory.faults().set_for(Op::Set, Fault::Error);
    cache
        .apply(Changes::from_backplane(vec![Change::announced(
            key("a"),
            Some(3),
            Some(val("v3")),
        )]))
        .await;
    memory.faults().clear();
    assert!(
        memory.get_ref().get(&key("a")).await.unwrap().is_none(),
        "dropped"
    );
}
