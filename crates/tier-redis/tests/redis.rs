//! The Redis tier against the real local Redis (`REDIS_URL`), each test under its own prefix.
//! The checks live in `contract/`, shared with the Redis Cluster test.

mod contract;

use std::time::Duration;

use contract::{Config, Setup, config, k};
use tiercache_core::{CacheTier, Entry};
use tiercache_redis::RedisTier;
use tiercache_testkit::{FaultProxy, ProxyMode, env, redis_env};

#[tokio::test]
async fn set_get_and_remaining_ttl() {
    contract::set_get_and_remaining_ttl(&Setup::single().await).await;
}

#[tokio::test]
async fn an_entry_expiring_sooner_keeps_its_own_expiry() {
    contract::an_entry_expiring_sooner_keeps_its_own_expiry(&Setup::single().await).await;
}

#[tokio::test]
async fn entries_expire_in_redis() {
    contract::entries_expire_in_redis(&Setup::single().await).await;
}

#[tokio::test]
async fn older_versions_never_overwrite_newer_ones() {
    contract::older_versions_never_overwrite_newer_ones(&Setup::single().await).await;
}

#[tokio::test]
async fn tombstones_refuse_versions_up_to_theirs() {
    contract::tombstones_refuse_versions_up_to_theirs(&Setup::single().await).await;
}

#[tokio::test]
async fn a_tombstone_refuses_until_it_dies() {
    contract::a_tombstone_refuses_until_it_dies(&Setup::single().await).await;
}

#[tokio::test]
async fn manual_invalidation_refuses_older_versions_only() {
    contract::manual_invalidation_refuses_older_versions_only(&Setup::single().await).await;
}

#[tokio::test]
async fn invalidate_many_applies_each_rule_per_key() {
    contract::invalidate_many_applies_each_rule_per_key(&Setup::single().await).await;
}

#[tokio::test]
async fn get_many_keeps_order_and_misses() {
    contract::get_many_keeps_order_and_misses(&Setup::single().await).await;
}

#[tokio::test]
async fn clear_removes_only_this_prefix() {
    contract::clear_removes_only_this_prefix(&Setup::single().await).await;
}

#[tokio::test]
async fn corrupt_bytes_are_a_miss_deleted_and_counted() {
    contract::corrupt_bytes_are_a_miss_deleted_and_counted(&Setup::single().await).await;
}

#[tokio::test]
async fn large_values_are_compressed_and_round_trip() {
    contract::large_values_are_compressed_and_round_trip(&Setup::single().await).await;
}

#[tokio::test]
async fn keys_with_separators_and_globs_do_not_collide() {
    contract::keys_with_separators_and_globs_do_not_collide(&Setup::single().await).await;
}

#[tokio::test]
async fn both_codecs_round_trip_and_read_each_other() {
    contract::both_codecs_round_trip_and_read_each_other(&Setup::single().await).await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_fast_and_transiently() {
    // Nothing listens on port 1. The tier builds (a service must start while Redis is down).
    let t: RedisTier<String, Config> = RedisTier::builder()
        .url("redis://127.0.0.1:1/")
        .build()
        .unwrap();
    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(5), t.get(&k("a")))
            .await
            .expect("a down Redis must not hang a call")
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        let err = t
            .set(&k("a"), Entry::new(config("x"), 1))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
    }
    assert!(!t.is_connected());
    assert!(t.stats().errors >= 6);
}

/// A Redis that refuses connections: every call fails with a transient error, and each asks
/// Redis again (the tier keeps no fail-fast window of its own; the chain's breaker decides
/// when to stop asking: `userconfig/tests/faults.rs`,
/// `a_down_server_is_asked_at_most_once_per_cool_down`).
#[tokio::test]
async fn a_refused_connection_fails_each_call_and_each_asks_again() {
    let server = env::redis_url();
    let proxy = FaultProxy::start(&redis_env::host_of(&server)).await;
    proxy.set_mode(ProxyMode::Reset);
    let t: RedisTier<String, Config> = RedisTier::builder()
        .url(format!("redis://{}/", proxy.addr()))
        .prefix(redis_env::unique_prefix("refused"))
        .build()
        .unwrap();
    for _ in 0..3 {
        let before = proxy.connections();
        let err = t.get(&k("a")).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(proxy.connections() > before, "asked Redis again: {err:?}");
    }
    assert!(!t.is_connected());
    assert_eq!(t.stats().errors, 3);
    // Back: the next call answers.
    proxy.set_mode(ProxyMode::Pass);
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(t.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_connection_is_finished_in_the_background() {
    // A far server: 80 ms each way, so connecting (TCP, then the client's handshake, then the
    // first command) takes longer than the callers wait.
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let proxy = FaultProxy::start(&host).await;
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(80)));
    let t: RedisTier<String, Config> = RedisTier::builder()
        .url(format!("redis://{}/", proxy.addr()))
        .prefix(redis_env::unique_prefix("slow_connect"))
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    // A caller that gives up after 50 ms, like a chain's time limit.
    let first = tokio::time::timeout(Duration::from_millis(50), t.get(&k("a"))).await;
    assert!(!matches!(first, Ok(Ok(_))), "connecting takes longer");
    // Nobody calls meanwhile: the connection is finished all the same.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !t.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection was not finished in the background"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.set_mode(ProxyMode::Pass);
    let answered = tokio::time::timeout(Duration::from_millis(50), t.get(&k("a"))).await;
    assert!(matches!(answered, Ok(Ok(None))), "{answered:?}");
}

#[test]
fn a_connection_cut_short_by_its_runtime_is_tried_again_on_the_next() {
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    // The proxy runs on a runtime of its own, which lives through the test.
    let proxies = runtime();
    let proxy = proxies.block_on(FaultProxy::start(&host));
    // Nothing answers: the connection attempt hangs.
    proxy.set_mode(ProxyMode::Blackhole);
    let first = runtime();
    let t = first.block_on(async {
        let t: RedisTier<String, Config> = RedisTier::builder()
            .url(format!("redis://{}/", proxy.addr()))
            .prefix(redis_env::unique_prefix("cut_connect"))
            .build()
            .unwrap();
        assert!(t.get(&k("a")).await.is_err(), "still connecting");
        t
    });
    // The runtime the connection was being made on goes away mid-attempt.
    drop(first);
    let second = runtime();
    second.block_on(async {
        proxy.set_mode(ProxyMode::Pass);
        assert!(
            t.connect_within(Duration::from_secs(5)).await,
            "a new attempt was made"
        );
        assert!(t.get(&k("a")).await.unwrap().is_none());
    });
}
