//! The consistency verifier on the real servers (`REDIS_URL`, `DATABASE_URL`): a clean run
//! with writes racing reads counts no inconsistency; an old envelope put back into Redis behind
//! the chain's back is counted as one, for Redis.

use std::time::Duration;

use userconfig::UserConfigStorage;

mod support;
use support::{Servers, themed};

const GRACE: Duration = Duration::from_millis(300);

/// An instance that checks every read a cache answers, `GRACE` after it.
async fn checked(s: &Servers, backplane: bool) -> UserConfigStorage {
    UserConfigStorage::builder()
        .redis_tier(s.redis.clone())
        .postgres_source(s.postgres.clone())
        .backplane(backplane)
        .consistency_checks(1, GRACE, 10_000)
        .build()
        .await
        .unwrap()
}

/// Waits until `storage` has checked `n` reads.
async fn checked_at_least(storage: &UserConfigStorage, n: u64) -> userconfig::ConsistencyStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = storage.get_cache_stats().consistency;
        if stats.checked_memory + stats.checked_redis >= n {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "checks never ran: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_counts_no_inconsistency() {
    let s = Servers::new("consistency_clean").await;
    let writer = s.instance().await;
    let reader = checked(&s, true).await;
    let mut reads = 0;
    for n in 0..20 {
        writer
            .update_user_config("cleo", &themed("cleo", &format!("t{n}")))
            .await
            .unwrap();
        for _ in 0..5 {
            reader.get_user_config("cleo").await.unwrap();
            reads += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let cache_reads = {
        let stats = reader.get_cache_stats();
        stats.memory_cache.hits + stats.redis_cache.stats.map_or(0, |r| r.hits)
    };
    assert!(cache_reads > 0 && cache_reads <= reads);
    let stats = checked_at_least(&reader, cache_reads).await;
    assert_eq!(
        (stats.inconsistent_memory, stats.inconsistent_redis),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.inconsistent_last_hour, 0);
    assert!(stats.nines_last_hour.is_some());
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_envelope_put_back_into_redis_is_counted_as_inconsistent() {
    let s = Servers::new("consistency_injected").await;
    let writer = s.instance().await;
    writer
        .update_user_config("ines", &themed("ines", "old"))
        .await
        .unwrap();
    writer.flush(Duration::from_secs(5)).await.unwrap();
    // Redis's bytes for version 1, kept aside.
    let client = tiercache_testkit::redis_env::redis_client().await;
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key = s.redis.redis_key(&"ines".to_string());
    let old: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!old.is_empty());
    writer
        .update_user_config("ines", &themed("ines", "new"))
        .await
        .unwrap();
    writer.flush(Duration::from_secs(5)).await.unwrap();
    // Long after the change, version 1 goes back into Redis behind every chain's back.
    tokio::time::sleep(GRACE * 2).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(old.as_slice())
        .query_async(&mut con)
        .await
        .unwrap();
    // A new instance (empty memory) is served the old copy by Redis: the verifier says so.
    let reader = checked(&s, false).await;
    let served = reader.fetch_user_config("ines").await.unwrap();
    assert_eq!(served.config.preferences.theme, "old", "the injection took");
    let stats = checked_at_least(&reader, 1).await;
    assert_eq!(
        (stats.checked_redis, stats.inconsistent_redis),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.inconsistent_memory, 0);
    assert!(stats.nines_last_hour.is_some_and(|n| n == 0.0), "{stats:?}");
    s.cleanup().await;
}
