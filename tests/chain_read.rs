//! The read path: tiers in order, back-fill with capped TTLs, negative caching, tier failures
//! skipped, fail-safe stale copies, stats that add up.

mod support;

use std::time::Duration;

use support::{Chain, Key, L2_TTL, MEMORY_TTL, Val, key, val};
use tiercache_core::{CacheTier, Entry, Error, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Op};

#[tokio::test]
async fn a_source_hit_back_fills_every_tier_and_the_next_read_is_a_memory_hit() {
    let c = Chain::new();
    c.db.put(key("alice"), "dark".to_string());

    let first = c.cache.fetch(&key("alice")).await.unwrap();
    assert_eq!(first.origin, Origin::Source);
    assert_eq!(first.version, 1);
    assert_eq!(c.memory_version("alice").await, Some(1));
    assert_eq!(c.redis.version(&key("alice")), Some(1));

    let second = c.cache.fetch(&key("alice")).await.unwrap();
    assert_eq!(second.origin, Origin::Tier(0));
    assert_eq!(second.value.as_deref().map(String::as_str), Some("dark"));
    assert_eq!(c.db.calls().get, 1);
    assert_eq!(c.redis.calls().get, 1);
}

#[tokio::test]
async fn each_tier_keeps_its_own_ttl() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    let now = c.manual.now();
    let in_memory = c.memory.get(&key("a")).await.unwrap().unwrap();
    assert_eq!(in_memory.remaining(now), Some(MEMORY_TTL));
    let in_redis = c.redis.entry(&key("a")).unwrap();
    assert_eq!(in_redis.remaining(now), Some(L2_TTL));
}

#[tokio::test]
async fn a_lower_hit_back_fills_with_the_smaller_of_the_tier_ttl_and_the_remaining_ttl() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();

    // Memory expired, Redis still has 25 minutes: memory gets its own 5 minutes.
    c.manual.advance(MEMORY_TTL);
    let hit = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(hit.origin, Origin::Tier(1));
    let e = c.memory.get(&key("a")).await.unwrap().unwrap();
    assert_eq!(e.remaining(c.manual.now()), Some(MEMORY_TTL));

    // Redis has 100 s left: memory gets 100 s, not 5 minutes.
    c.manual
        .advance(L2_TTL - MEMORY_TTL - Duration::from_secs(100));
    c.memory.remove_all();
    let hit = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(hit.origin, Origin::Tier(1));
    let e = c.memory.get(&key("a")).await.unwrap().unwrap();
    assert_eq!(e.remaining(c.manual.now()), Some(Duration::from_secs(100)));

    c.manual.advance(Duration::from_secs(100));
    let reload = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(
        reload.origin,
        Origin::Source,
        "both copies expired together"
    );
    assert_eq!(c.db.calls().get, 2);
}

#[tokio::test]
async fn a_hit_at_the_second_tier_does_not_call_the_source() {
    let c = Chain::new();
    c.redis
        .set(&key("a"), Entry::new(val("from redis"), 4))
        .await
        .unwrap();
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(got.origin, Origin::Tier(1));
    assert_eq!(got.version, 4);
    assert_eq!(c.db.calls().get, 0);
    assert_eq!(c.memory_version("a").await, Some(4));
}

#[tokio::test]
async fn not_found_is_an_outcome_and_is_cached_for_the_negative_ttl() {
    let c = Chain::with(|b| b.negative_ttl(Some(Duration::from_secs(30))));
    let missing = c.cache.fetch(&key("ghost")).await.unwrap();
    assert!(!missing.is_found());
    assert_eq!((missing.origin, missing.version), (Origin::Source, 0));

    let again = c.cache.fetch(&key("ghost")).await.unwrap();
    assert!(!again.is_found());
    assert_eq!(again.origin, Origin::Tier(0), "the not-found was cached");
    assert_eq!(c.db.calls().get, 1);

    c.manual.advance(Duration::from_secs(30));
    assert_eq!(
        c.cache.fetch(&key("ghost")).await.unwrap().origin,
        Origin::Source
    );
    assert_eq!(c.db.calls().get, 2);

    // A write replaces the cached not-found at once.
    c.cache.update(&key("ghost"), val("real")).await.unwrap();
    let found = c.cache.get(&key("ghost")).await.unwrap();
    assert_eq!(found.as_deref().map(String::as_str), Some("real"));
}

#[tokio::test]
async fn without_negative_caching_every_miss_asks_the_source() {
    let c = Chain::with(|b| b.negative_ttl(None));
    for _ in 0..3 {
        assert!(c.cache.get(&key("ghost")).await.unwrap().is_none());
    }
    assert_eq!(c.db.calls().get, 3);
    assert_eq!(c.cache.stats().not_found, 3);
}

#[tokio::test]
async fn a_failing_cache_tier_is_counted_and_skipped() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.redis.faults().set(Fault::Error);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(got.origin, Origin::Source);
    assert_eq!(
        c.memory_version("a").await,
        Some(1),
        "memory was still filled"
    );
    let stats = c.cache.stats();
    // One failed get and one failed back-fill.
    assert_eq!(stats.tiers[1].errors, 2);
    assert_eq!(stats.failed, 0);
}

#[tokio::test]
async fn a_hanging_cache_tier_times_out_and_is_skipped() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.redis.faults().set(Fault::Hang);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(got.origin, Origin::Source);
    let redis = &c.cache.stats().tiers[1];
    assert_eq!(
        redis.timeouts, 2,
        "the get and the back-fill each timed out"
    );
    assert_eq!(redis.errors, 2);
}

#[tokio::test]
async fn the_source_failing_without_a_cached_copy_is_a_typed_transient_error() {
    let c = Chain::new();
    c.db.faults().set(Fault::Error);
    let err = c.cache.get(&key("a")).await.unwrap_err();
    assert!(matches!(err, Error::SourceUnavailable { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(err.tier(), Some("db"));
    assert_eq!(c.cache.stats().failed, 1);
}

#[tokio::test]
async fn a_hanging_source_times_out_into_a_typed_error() {
    let c = Chain::new();
    c.db.faults().set(Fault::Hang);
    let err = c.cache.get(&key("a")).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

#[tokio::test]
async fn the_source_failing_serves_a_stale_copy_within_max_stale() {
    let c = Chain::with(|b| b.max_stale(Some(Duration::from_secs(600))));
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    // Everything expired 5 minutes ago.
    c.manual.advance(L2_TTL + Duration::from_secs(300));
    c.db.faults().set(Fault::Error);
    let stale = c.cache.fetch(&key("a")).await.unwrap();
    assert!(matches!(stale.origin, Origin::Stale(_)), "{stale:?}");
    assert_eq!(stale.version, 1);
    assert_eq!(c.cache.stats().stale_served, 1);

    // 11 minutes past expiry: too old.
    c.manual.advance(Duration::from_secs(360));
    assert!(c.cache.get(&key("a")).await.is_err());
}

#[tokio::test]
async fn with_fail_safe_off_no_stale_copy_is_served() {
    let c = Chain::with(|b| b.max_stale(None));
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.manual.advance(L2_TTL);
    c.db.faults().set(Fault::Error);
    assert!(c.cache.get(&key("a")).await.is_err());
}

#[tokio::test]
async fn fresh_cached_copies_are_served_while_the_source_is_down() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.db.faults().set(Fault::Error);
    assert!(c.cache.get(&key("a")).await.unwrap().is_some());
    c.memory.remove_all();
    assert_eq!(
        c.cache.fetch(&key("a")).await.unwrap().origin,
        Origin::Tier(1)
    );
}

#[tokio::test]
async fn get_many_answers_tier_by_tier_with_one_batch_call_each() {
    let c = Chain::new();
    for k in ["a", "b", "c", "d"] {
        c.db.put(key(k), format!("value of {k}"));
    }
    c.cache.get(&key("a")).await.unwrap(); // a in memory and redis
    c.redis
        .set(&key("b"), Entry::new(val("value of b"), 1))
        .await
        .unwrap(); // b in redis only
    let keys: Vec<_> = ["a", "b", "c", "ghost"].into_iter().map(key).collect();
    let got = c.cache.get_many(&keys).await.unwrap();
    let got: Vec<Option<&str>> = got
        .iter()
        .map(|v| v.as_deref().map(String::as_str))
        .collect();
    assert_eq!(
        got,
        [
            Some("value of a"),
            Some("value of b"),
            Some("value of c"),
            None
        ]
    );
    assert_eq!(c.redis.calls().get_many, 1);
    assert_eq!(c.db.calls().get_many, 1);
    assert_eq!(c.memory_version("b").await, Some(1), "b was back-filled");
    assert_eq!(c.memory_version("c").await, Some(1), "c was back-filled");
    let stats = c.cache.stats();
    assert_eq!(stats.requests, 5);
    assert_eq!(stats.not_found, 1);
}

#[tokio::test]
async fn get_many_serves_stale_copies_when_the_source_fails() {
    let c = Chain::new();
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.manual.advance(L2_TTL);
    c.db.faults().set_for(Op::Get, Fault::Error);
    let got = c.cache.get_many(&[key("a")]).await.unwrap();
    assert!(got[0].is_some());
    let err = c.cache.get_many(&[key("a"), key("b")]).await.unwrap_err();
    assert!(err.is_transient());
}

#[tokio::test]
async fn get_many_counts_every_key_when_the_source_fails() {
    let c = Chain::with(|b| b.max_stale(None));
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap(); // a in memory
    let before = c.cache.stats();
    c.db.faults().set_for(Op::Get, Fault::Error);
    let keys: Vec<_> = ["a", "b", "c"].into_iter().map(key).collect();
    let err = c.cache.get_many(&keys).await.unwrap_err();
    assert!(err.is_transient());
    let stats = c.cache.stats();
    assert_eq!(
        stats.tiers[0].hits - before.tiers[0].hits,
        1,
        "a: a memory hit"
    );
    assert_eq!(
        stats.failed - before.failed,
        2,
        "b and c: failed, both counted"
    );
    assert_eq!(
        stats.requests - before.requests,
        3,
        "every key's outcome counted"
    );
}

#[tokio::test]
async fn stats_add_up() {
    let c = Chain::with(|b| b.max_stale(Some(Duration::from_secs(3600))));
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap(); // source
    c.cache.get(&key("a")).await.unwrap(); // memory
    c.memory.remove_all();
    c.cache.get(&key("a")).await.unwrap(); // redis
    c.cache.get(&key("ghost")).await.unwrap(); // not found
    c.manual.advance(L2_TTL);
    c.db.faults().set(Fault::Error);
    c.cache.get(&key("a")).await.unwrap(); // stale
    let _ = c.cache.get(&key("nobody")).await; // failed

    let s = c.cache.stats();
    assert_eq!(s.tiers[0].hits, 1);
    assert_eq!(s.tiers[1].hits, 1);
    assert_eq!(s.source.hits, 1);
    assert_eq!((s.not_found, s.stale_served, s.failed), (1, 1, 1));
    let answered: u64 = s.tiers.iter().map(|t| t.hits).sum::<u64>()
        + s.source.hits
        + s.not_found
        + s.stale_served
        + s.failed;
    assert_eq!(s.requests, 6);
    assert_eq!(s.requests, answered);
    assert_eq!(s.tiers[0].hits + s.tiers[0].misses, s.requests);
    let mem = &s.tiers[0].tier;
    assert_eq!(mem.total_requests, mem.hits + mem.misses);
    assert_eq!(mem.max_size, Some(500));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["tiers"][0]["tier"]["max_size"], 500);
}

#[tokio::test]
async fn a_non_transient_source_error_is_returned_as_it_is_and_serves_no_stale_copy() {
    let c = Chain::with(|b| b.max_stale(Some(Duration::from_secs(3600))));
    c.db.put(key("a"), "v".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.manual.advance(L2_TTL);
    // A transient failure: the stale copy is served.
    c.db.faults().set(Fault::Error);
    assert!(matches!(
        c.cache.fetch(&key("a")).await.unwrap().origin,
        Origin::Stale(_)
    ));
    c.db.faults().clear();
    // A mock source that answers "corrupt": the caller sees that error, typed.
    let mut source = tiercache_testkit::MockSource::<String, String>::new();
    source.expect_name().return_const("db".to_string());
    source.expect_follow().returning(|| None);
    source
        .expect_get()
        .returning(|_| Err(Error::corrupt("db", std::fmt::Error)));
    let cache = tiercache_core::TieredCache::builder()
        .source(source)
        .build()
        .unwrap();
    let err = cache.get(&key("a")).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
}

#[tokio::test]
async fn background_back_fill_answers_first_and_fills_the_lower_tiers_after() {
    let c = Chain::with(|b| b.background_backfill(true));
    c.db.put(key("a"), "v".to_string());
    let gate = tiercache_testkit::Gate::new();
    c.redis.faults().set_for(Op::Set, Fault::Hold(gate.clone()));
    // The answer does not wait for the held Redis write.
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(got.origin, Origin::Source);
    assert_eq!(c.memory_version("a").await, Some(1), "memory filled inline");
    gate.arrived(1).await;
    gate.open();
    for _ in 0..100 {
        if c.redis.version(&key("a")).is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        c.redis.version(&key("a")),
        Some(1),
        "redis filled in the background"
    );
}

#[tokio::test]
async fn warm_loads_keys_in_batches() {
    let c = Chain::new();
    for i in 0..25 {
        c.db.put(key(&format!("u{i}")), "v".to_string());
    }
    let keys: Vec<_> = (0..30).map(|i| key(&format!("u{i}"))).collect();
    assert_eq!(c.cache.warm(&keys, 10).await.unwrap(), 25);
    assert_eq!(c.db.calls().get_many, 3);
    assert_eq!(c.redis.calls().get_many, 3);
    assert_eq!(c.memory_version("u7").await, Some(1));
    assert_eq!(
        c.cache.fetch(&key("u7")).await.unwrap().origin,
        Origin::Tier(0)
    );
}

/// The chain reads the time from the clock it was built with (here the tests' manual clock),
/// and says which.
#[tokio::test]
async fn the_chain_keeps_the_clock_it_was_built_with() {
    let c = Chain::new();
    c.manual.advance(Duration::from_secs(3_600));
    assert!(c.cache.clock().is_manual());
    assert_eq!(c.cache.clock().now(), c.manual.now());
}

/// `export_metrics` publishes the chain's statistics as they are: the request counters per
/// tier and outcome, and the latency quantiles in seconds.
#[tokio::test]
async fn exported_metrics_are_the_chains_statistics() {
    let c = Chain::new();
    c.db.put(key("alice"), "dark".to_string());
    for _ in 0..3 {
        c.cache.get(&key("alice")).await.unwrap();
    }
    c.cache.get(&key("nobody")).await.unwrap();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || c.cache.export_metrics());
    let text = handle.render();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let s = c.cache.stats();
    assert_eq!(s.tiers[0].hits, 2);
    assert_eq!(
        s.cache_hit_rate,
        2.0 / 4.0,
        "two of four requests hit a cache tier"
    );
    let memory_hits = r#"tiercache_requests_total{tier="memory",outcome="hit"}"#;
    assert_eq!(value(memory_hits), 2.0);
    assert_eq!(
        value(r#"tiercache_requests_total{tier="db",outcome="found"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tiercache_requests_total{tier="db",outcome="not_found"}"#),
        1.0
    );
    assert_eq!(value("tiercache_source_loads_total"), 2.0);
    let p50 = value(r#"tiercache_tier_latency_seconds{tier="db",quantile="0.5"}"#);
    assert_eq!(p50, s.source.latency.p50_us / 1e6);
    assert_eq!(value(r#"tiercache_breaker_open{tier="redis"}"#), 0.0);
}

/// An expiry the source's entry carries (a source that is itself a cache, say) is not copied
/// into the cache tiers: each applies its own TTL to what it is given.
#[tokio::test]
async fn the_cache_tiers_apply_their_own_ttl_not_the_sources_expiry() {
    let manual = tiercache_testkit::ManualClock::new();
    let expiring = Entry {
        expires_at: Some(manual.now() + Duration::from_secs(1)),
        ..Entry::new(val("dark"), 4)
    };
    let mut db = tiercache_testkit::MockSource::<String, String>::new();
    db.expect_name().return_const("db".to_string());
    db.expect_follow().returning(|| None);
    db.expect_get()
        .times(1)
        .returning(move |_| Ok(Some(expiring.clone())));
    let redis = FakeTier::cache("redis")
        .with_ttl(L2_TTL)
        .with_clock(manual.clock());
    let cache = tiercache_core::TieredCache::builder()
        .tier(redis.clone())
        .source(db)
        .clock(manual.clock())
        .build()
        .unwrap();
    assert_eq!(
        cache.fetch(&key("alice")).await.unwrap().origin,
        Origin::Source
    );
    let held = redis.entry(&key("alice")).unwrap();
    assert_eq!(held.expires_at, Some(manual.now() + L2_TTL));
    manual.advance(Duration::from_secs(2));
    let again = cache.fetch(&key("alice")).await.unwrap();
    assert_eq!((again.origin, again.version), (Origin::Tier(0), 4));
}

/// A source hit fills every cache tier, however many there are.
#[tokio::test]
async fn a_source_hit_back_fills_every_tier_of_a_three_tier_chain() {
    let (l2, l3, db) = (
        FakeTier::cache("l2"),
        FakeTier::cache("l3"),
        FakeSource::new("db"),
    );
    db.put(key("alice"), "dark".to_string());
    for background in [false, true] {
        let cache: TieredCache<Key, Val> = TieredCache::builder()
            .tier(MemoryTier::new())
            .tier(l2.clone())
            .tier(l3.clone())
            .source(db.clone())
            .background_backfill(background)
            .build()
            .unwrap();
        l2.clear().await.unwrap();
        l3.clear().await.unwrap();
        assert_eq!(
            cache.fetch(&key("alice")).await.unwrap().origin,
            Origin::Source
        );
        cache.flush(Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            (l2.version(&key("alice")), l3.version(&key("alice"))),
            (Some(1), Some(1)),
            "background back-fill: {background}"
        );
    }
}
