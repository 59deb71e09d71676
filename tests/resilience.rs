//! Circuit breakers, replayed invalidations and the backplane, on fakes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Key, Val, key, val};
use tiercache_core::{BreakerPolicy, CacheTier, Change, Changes, Error, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{BackplaneHub, FakeSource, FakeTier, Fault, Op};

fn breaker() -> BreakerPolicy {
    BreakerPolicy {
        threshold: 2,
        cooldown: Duration::from_millis(50),
    }
}

fn chain(redis: &FakeTier<Key, Val>, db: &FakeSource<Key, Val>) -> TieredCache<Key, Val> {
    TieredCache::builder()
        .tier(MemoryTier::new())
        .tier_with_timeout(redis.clone(), Some(Duration::from_millis(20)))
        .source(db.clone())
        .breaker(breaker())
        .build()
        .unwrap()
}

/// `redis` over `db`, no memory tier, no breaker: every call reaches the fake.
fn one_tier(redis: &FakeTier<Key, Val>, db: &FakeSource<Key, Val>) -> TieredCache<Key, Val> {
    TieredCache::builder()
        .tier(redis.clone())
        .source(db.clone())
        .breaker(BreakerPolicy::never())
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_open_breaker_stops_paying_the_timeout_until_a_probe_succeeds() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    for k in 0..10 {
        db.put(key(&format!("k{k}")), "v".to_string());
    }
    let cache = chain(&redis, &db);
    redis.faults().set(Fault::Hang);
    for k in 0..10 {
        // Every read still answers, from the database.
        let got = cache.fetch(&key(&format!("k{k}"))).await.unwrap();
        assert_eq!(got.origin, Origin::Source);
    }
    let s = cache.stats();
    let redis_stats = &s.tiers[1];
    assert!(redis_stats.breaker_open);
    assert_eq!(redis_stats.breaker_opened, 1);
    assert_eq!(redis_stats.timeouts, 2, "only until the breaker opened");
    assert!(
        redis_stats.skipped >= 15,
        "the rest skipped: {redis_stats:?}"
    );
    assert_eq!(s.failed, 0);

    // Redis answers again: after the cool-down one call probes it, and it is used again.
    redis.faults().clear();
    tokio::time::sleep(Duration::from_millis(60)).await;
    cache.clear_tier(0).await.unwrap();
    assert_eq!(
        cache.fetch(&key("k0")).await.unwrap().origin,
        Origin::Source,
        "the probe read found nothing in redis and filled it"
    );
    assert!(!cache.stats().tiers[1].breaker_open);
    cache.clear_tier(0).await.unwrap();
    assert_eq!(
        cache.fetch(&key("k0")).await.unwrap().origin,
        Origin::Tier(1),
        "redis answers again"
    );
}

#[tokio::test]
async fn a_probe_whose_caller_gives_up_does_not_keep_the_breaker_open() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    db.put(key("k"), "v".to_string());
    let cache = chain(&redis, &db);
    redis.faults().set(Fault::Error);
    for _ in 0..2 {
        cache.clear_tier(0).await.unwrap();
        cache.fetch(&key("k")).await.unwrap();
    }
    assert!(cache.stats().tiers[1].breaker_open);
    // After the cool-down the next call probes Redis, which is slow now; its caller gives up
    // first and the probe's future is dropped half-way.
    tokio::time::sleep(Duration::from_millis(60)).await;
    redis.faults().set(Fault::Delay(Duration::from_secs(5)));
    cache.clear_tier(0).await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_millis(5), cache.fetch(&key("k"))).await;
    assert!(dropped.is_err(), "the caller gave up during the probe");
    // Redis is healthy again: after another cool-down a probe must reach it.
    redis.faults().clear();
    redis
        .set(&key("k"), tiercache_core::Entry::new(val("v"), 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    cache.clear_tier(0).await.unwrap();
    assert_eq!(
        cache.fetch(&key("k")).await.unwrap().origin,
        Origin::Tier(1),
        "redis answers again after a dropped probe"
    );
    assert!(!cache.stats().tiers[1].breaker_open);
}

#[tokio::test]
async fn an_unreachable_source_fails_fast_once_its_breaker_opens() {
    let db = FakeSource::<Key, Val>::new("db");
    db.faults().set(Fault::Hang);
    let cache = TieredCache::builder()
        .tier(MemoryTier::new())
        .source_with_timeout(db.clone(), Some(Duration::from_millis(20)))
        .breaker(breaker())
        .build()
        .unwrap();
    for i in 0..5 {
        let err = cache.get(&key(&format!("k{i}"))).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(matches!(err, Error::SourceUnavailable { .. }));
    }
    let s = cache.stats();
    assert_eq!(s.source.timeouts, 2);
    assert!(s.source.skipped >= 3);
    assert_eq!(s.failed, 5);
}

#[tokio::test]
async fn invalidations_missed_while_a_tier_was_down_are_replayed_when_it_returns() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = chain(&redis, &db);
    a.update(&key("x"), val("v1")).await.unwrap();
    redis.faults().set(Fault::Error);
    a.update(&key("x"), val("v2")).await.unwrap();
    a.invalidate(&key("y")).await.unwrap_err();
    assert_eq!(redis.version(&key("x")), Some(1), "redis kept the old copy");
    assert_eq!(a.stats().tiers[1].pending_repairs, 2);

    // Another instance sharing redis would read version 1: the writer replays what redis
    // missed as soon as it answers again, in the background, with no read to trigger it.
    redis.faults().clear();
    a.flush(Duration::from_secs(2))
        .await
        .expect("every missed invalidation replayed");
    assert_eq!(a.stats().tiers[1].pending_repairs, 0);
    assert_eq!(redis.version(&key("x")), None, "version 1 removed");
    let b = chain(&redis, &db);
    assert_eq!(b.fetch(&key("x")).await.unwrap().version, 2);
}

#[tokio::test(start_paused = true)]
async fn no_read_uses_a_tier_while_its_replay_of_that_key_is_pending() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = chain(&redis, &db);
    db.put(key("x"), "v1".to_string());
    a.fetch(&key("x")).await.unwrap(); // version 1 in memory and redis
    db.put(key("x"), "edited behind the cache's back".to_string());
    // The manual invalidation cannot reach redis: it is remembered for replay.
    redis.faults().set(Fault::Error);
    a.invalidate(&key("x")).await.unwrap_err();
    assert_eq!(redis.version(&key("x")), Some(1), "redis kept the old copy");
    // Redis answers again, slowly: its replay is in flight for a while.
    redis
        .faults()
        .set_for(Op::Invalidate, Fault::Delay(Duration::from_millis(15)));
    redis
        .faults()
        .set_for(Op::Get, Fault::Delay(Duration::ZERO));
    redis
        .faults()
        .set_for(Op::Set, Fault::Delay(Duration::ZERO));
    // Another key's read reaches redis (and, on the old code, started the replay there).
    let other = {
        let a = a.clone();
        tokio::spawn(async move { a.fetch(&key("y")).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let got = a.fetch(&key("x")).await.unwrap();
    assert_eq!(
        got.version, 2,
        "read redis's old copy (from {:?})",
        got.origin
    );
    other.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_tier_that_missed_more_than_the_bound_is_cleared_and_skipped_until_then() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = TieredCache::builder()
        .tier(MemoryTier::new())
        .tier_with_timeout(redis.clone(), Some(Duration::from_millis(20)))
        .source(db.clone())
        .breaker(BreakerPolicy::never())
        .max_pending_repairs(2)
        .build()
        .unwrap();
    for k in ["x", "y", "z"] {
        a.update(&key(k), val("v1")).await.unwrap();
    }
    db.put(key("other"), "v1".to_string());
    redis
        .set(&key("other"), tiercache_core::Entry::new(val("v1"), 1))
        .await
        .unwrap();
    redis.faults().set(Fault::Error);
    for k in ["x", "y", "z"] {
        a.update(&key(k), val("v2")).await.unwrap();
    }
    // Three missed for a bound of two: the whole tier is suspect, even keys never missed.
    assert!(a.stats().tiers[1].pending_repairs >= 1);
    let got = a.fetch(&key("other")).await.unwrap();
    assert_eq!(got.origin, Origin::Source, "redis skipped for every key");
    // Back: the tier is cleared (not replayed key by key), then used again.
    redis.faults().clear();
    a.flush(Duration::from_secs(2)).await.unwrap();
    assert!(redis.calls().clear >= 1, "cleared");
    assert!(redis.version(&key("x")).is_none() && redis.version(&key("other")).is_none());
    a.clear_tier(0).await.unwrap();
    a.fetch(&key("other")).await.unwrap();
    a.clear_tier(0).await.unwrap();
    assert_eq!(
        a.fetch(&key("other")).await.unwrap().origin,
        Origin::Tier(1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_replay_whose_caller_gives_up_leaves_its_keys_to_the_replay_task() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = TieredCache::builder()
        .tier(MemoryTier::new())
        .tier_with_timeout(redis.clone(), Some(Duration::from_millis(20)))
        .source(db.clone())
        .breaker(BreakerPolicy::never())
        .build()
        .unwrap();
    a.update(&key("x"), val("v1")).await.unwrap();
    redis.faults().set(Fault::Error);
    a.update(&key("x"), val("v2")).await.unwrap();
    // Redis answers again, slowly; while the replay task waits out its back-off, a caller
    // replays by hand and gives up half way.
    redis.faults().set(Fault::Delay(Duration::from_millis(15)));
    assert_eq!(a.stats().tiers[1].pending_repairs, 1);
    let gave_up = tokio::time::timeout(Duration::from_millis(5), a.repair()).await;
    assert!(gave_up.is_err());
    redis.faults().clear();
    a.flush(Duration::from_secs(2))
        .await
        .expect("the keys it held went back to the replay task");
    assert_eq!(redis.version(&key("x")), None, "version 1 removed");
}

#[tokio::test]
async fn the_backplane_evicts_older_copies_from_other_instances() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let hub = BackplaneHub::new(7);
    let mut instances = Vec::new();
    let mut memories = Vec::new();
    for _ in 0..3 {
        let memory = Arc::new(MemoryTier::<Key, Val>::new());
        let handle = hub.handle();
        let c = TieredCache::builder()
            .shared_tier(memory.clone(), None)
            .tier(redis.clone())
            .source(db.clone())
            .backplane(Arc::new(handle.clone()))
            .build()
            .unwrap();
        handle.attach(c.clone());
        instances.push(c);
        memories.push(memory);
    }
    instances[0].update(&key("k"), val("v1")).await.unwrap();
    for c in &instances {
        assert_eq!(c.fetch(&key("k")).await.unwrap().version, 1);
    }
    instances[0].update(&key("k"), val("v2")).await.unwrap();
    for (i, c) in instances.iter().enumerate() {
        let got = c.fetch(&key("k")).await.unwrap();
        assert_eq!(got.version, 2, "instance {i}");
    }
    assert_eq!(hub.delivered(), 4, "two updates, two other instances each");
    assert_eq!(instances[1].stats().remote_invalidations, 2);

    // A late message never evicts a newer entry.
    instances[2]
        .apply(Changes::from_backplane(vec![Change::announced(
            key("k"),
            Some(1),
            None,
        )]))
        .await;
    assert_eq!(
        instances[2].fetch(&key("k")).await.unwrap().origin,
        Origin::Tier(0)
    );
    // A manual invalidation reaches the others too.
    instances[1].invalidate(&key("k")).await.unwrap();
    assert!(memories[2].get(&key("k")).await.unwrap().is_none());

    // Messages lost: an instance that knows it may have missed some flushes its memory.
    assert_eq!(instances[2].fetch(&key("k")).await.unwrap().version, 2);
    hub.set_dropping(true);
    instances[0].update(&key("k"), val("v3")).await.unwrap();
    assert_eq!(instances[2].fetch(&key("k")).await.unwrap().version, 2);
    instances[2].flush_local().await;
    assert_eq!(instances[2].fetch(&key("k")).await.unwrap().version, 3);
}

#[tokio::test]
async fn errors_that_say_nothing_about_reachability_do_not_open_the_breaker() {
    let mut corrupt = tiercache_testkit::MockCacheTier::<Key, Val>::new();
    corrupt.expect_name().return_const("redis".to_string());
    corrupt
        .expect_peek()
        .returning(|_| tiercache_core::Peek::Unsupported);
    corrupt
        .expect_get()
        .returning(|_| Err(Error::corrupt("redis", std::fmt::Error)));
    corrupt.expect_set().returning(|_, _| Ok(true));
    corrupt
        .expect_stats()
        .returning(|| tiercache_core::TierStats::new("redis", 0, 0));
    let db = FakeSource::new("db");
    db.put(key("k"), "v".to_string());
    let cache = TieredCache::builder()
        .tier(corrupt)
        .source(db)
        .breaker(breaker())
        .build()
        .unwrap();
    for _ in 0..5 {
        assert_eq!(cache.fetch(&key("k")).await.unwrap().origin, Origin::Source);
    }
    let s = cache.stats();
    assert_eq!(s.tiers[0].errors, 5);
    assert_eq!((s.tiers[0].breaker_opened, s.tiers[0].skipped), (0, 0));
}

/// `flush` waits for what is left and no longer: with nothing left it returns at once (tokio's
/// paused clock makes the time it took exact), and at its deadline it names what is still
/// running (the chain's background tasks) or still owed (a tier's missed invalidations).
#[tokio::test(start_paused = true)]
async fn flush_returns_when_nothing_is_left_and_names_what_is_left_at_its_deadline() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = chain(&redis, &db);
    let started = tokio::time::Instant::now();
    a.flush(Duration::from_secs(60)).await.unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing to wait for");

    // An update whose caller gave up goes on in a task of the chain's.
    db.faults()
        .set_for(Op::Write, Fault::Delay(Duration::from_millis(500)));
    let x = key("x");
    let gave_up = tokio::time::timeout(Duration::from_millis(5), a.update(&x, val("v1"))).await;
    assert!(gave_up.is_err());
    let err = a.flush(Duration::from_millis(50)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unfinished { tier, what: "tasks", pending: 1 } if tier == "chain"),
        "{err:?}"
    );
    let started = tokio::time::Instant::now();
    a.flush(Duration::from_secs(60)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "returned when the task ended"
    );
    assert_eq!(db.version(&key("x")), Some(1));
    db.faults().clear();

    // An update that could not remove redis's copy owes redis an invalidation.
    redis.faults().set(Fault::Error);
    a.update(&key("x"), val("v2")).await.unwrap();
    let err = a.flush(Duration::from_millis(50)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unfinished { tier, what: "invalidations", pending: 1 } if tier == "redis"),
        "{err:?}"
    );
    redis.faults().clear();
    let started = tokio::time::Instant::now();
    a.flush(Duration::from_secs(60)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "returned when replayed"
    );
    assert_eq!(a.stats().tiers[1].pending_repairs, 0);
}

/// What a chain and a read's answer show in `Debug` (logs, panics): the tiers' names, the
/// policy, whether a value was found and its version; never the value.
#[tokio::test]
async fn debug_shows_tiers_and_versions_never_values() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    db.put(key("x"), "s3cret-value".to_string());
    let a = chain(&redis, &db);
    let chain_text = format!("{a:?}");
    assert!(
        chain_text
            .starts_with("TieredCache { tiers: [\"memory\", \"redis\"], source: \"db\", policy: "),
        "{chain_text}"
    );
    let fetched = a.fetch(&key("x")).await.unwrap();
    assert_eq!(
        format!("{fetched:?}"),
        "Fetched { found: true, version: 1, origin: Source }"
    );
    assert!(!format!("{fetched:#?}").contains("s3cret"));
}

/// The log, where a deployment looks first: a tier that starts failing is logged once (at
/// warn), however many calls fail, and its recovery once (at info); each request's span says
/// who answered, how, at which version and whether it joined another's load; never a value.
#[tokio::test]
async fn a_failing_tier_is_logged_once_when_it_fails_and_once_when_it_answers_again() {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The process's subscriber, not a thread's: tracing caches per call site whether anyone
    // listens, and other tests' threads hit the same call sites. Their lines name other
    // tiers; this test counts its own tier's.
    tracing::subscriber::set_global_default(subscriber).expect("the only test that sets one");
    let all = || String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = |what: &str| {
        all()
            .lines()
            .filter(|l| l.contains(what) && l.contains("tier=logged"))
            .count()
    };

    let (redis, db) = (FakeTier::cache("logged"), FakeSource::new("logged-db"));
    db.put(key("x"), "s3cret-value".to_string());
    let a = one_tier(&redis, &db);
    redis.faults().set(Fault::Error);
    for _ in 0..5 {
        a.fetch(&key("x")).await.unwrap();
    }
    a.fetch(&key("nobody")).await.unwrap();
    // Each request's span, closed, says who answered and how.
    let requests = |fields: &str| {
        all()
            .lines()
            .filter(|l| l.contains(&format!("tiercache.get{{{fields}}}: ")) && l.contains("close"))
            .count()
    };
    let db_said = |outcome: &str, version: u64| {
        format!(r#"coalesced=false answered_by="logged-db" outcome="{outcome}" version={version}"#)
    };
    assert_eq!(requests(&db_said("found", 1)), 5);
    assert_eq!(requests(&db_said("not_found", 0)), 1);
    assert_eq!(
        a.stats().tiers[0].errors,
        12,
        "a get and a back-fill per read"
    );
    assert_eq!(lines("tier failing"), 1);
    a.invalidate(&key("x")).await.unwrap_err();
    redis.faults().clear();
    for _ in 0..3 {
        a.fetch(&key("x")).await.unwrap();
    }
    // The missed invalidation is replayed (a batch, not a clear of the tier).
    a.flush(Duration::from_secs(2)).await.unwrap();
    assert_eq!(lines("tier failing"), 1);
    assert_eq!(lines("tier answers again"), 1);
    assert_eq!(lines("tier cleared"), 0);
    assert!(!all().contains("s3cret"));
}

/// A replay that keeps failing waits longer each time (doubling from 25 ms to 200 ms, less up
/// to half at random), so that a tier that is down is not asked a hundred times a second.
#[tokio::test(start_paused = true)]
async fn replays_that_keep_failing_back_off() {
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let a = one_tier(&redis, &db);
    redis.faults().set(Fault::Error);
    a.update(&key("x"), val("v1")).await.unwrap();
    let before = redis.calls().invalidate;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Waits of at least 12.5, 25, 50 and then 100 ms: at most 23 replays in two seconds
    // (about 80 or more at a steady 25 ms less jitter).
    let replays = redis.calls().invalidate - before;
    assert!((5..=23).contains(&replays), "{replays} replays in 2 s");
    redis.faults().clear();
    a.flush(Duration::from_secs(1)).await.unwrap();
}

/// A replay task that ends without finishing (its runtime shut down while it waited out a
/// back-off) does not stop replays for good: the next missed invalidation starts a new one,
/// which replays what both missed.
#[test]
fn a_replay_task_cut_short_by_its_runtime_is_started_again_by_the_next_miss() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (redis, db) = (FakeTier::cache("redis"), FakeSource::new("db"));
    let first = runtime();
    let a = first.block_on(async {
        let a = one_tier(&redis, &db);
        a.update(&key("x"), val("v1")).await.unwrap();
        redis.faults().set(Fault::Error);
        a.update(&key("x"), val("v2")).await.unwrap();
        a
    });
    assert_eq!(a.stats().tiers[0].pending_repairs, 1);
    drop(first);
    assert_eq!(redis.version(&key("x")), Some(1), "not replayed");
    runtime().block_on(async {
        a.update(&key("y"), val("w")).await.unwrap();
        redis.faults().clear();
        a.flush(Duration::from_secs(5))
            .await
            .expect("a new replay task replayed both");
        assert_eq!(redis.version(&key("x")), None);
    });
}
