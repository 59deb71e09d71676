//! The Redis backplane against the real local Redis: updates on one instance evict older copies
//! from the others' memory, own messages are ignored, a lost subscription flushes memory, and a
//! failed publish is retried.

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{CacheTier, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_redis::{RedisBackplane, RedisTier};
use tiercache_testkit::{FakeSource, FaultProxy, ProxyMode, env, redis_env};

type Chain = TieredCache<String, String>;

struct Instance {
    cache: Chain,
    memory: Arc<MemoryTier<String, String>>,
    backplane: RedisBackplane,
    channel: String,
}

/// Instances sharing one Redis tier, one source and one channel; `urls[i]` is where instance
/// i's backplane connects (the server, or a proxy in front of it).
async fn instances(tag: &str, urls: &[String]) -> (Vec<Instance>, FakeSource<String, String>) {
    let (out, db) = instances_unwaited(tag, urls).await;
    for i in &out {
        wait_until("subscribed", || i.backplane.is_subscribed()).await;
    }
    (out, db)
}

/// Like [`instances`], without waiting for the subscriptions.
async fn instances_unwaited(
    tag: &str,
    urls: &[String],
) -> (Vec<Instance>, FakeSource<String, String>) {
    let server = redis_env::redis_url().await;
    let prefix = redis_env::unique_prefix(tag);
    let channel = format!("{prefix}invalidations");
    let redis = Arc::new(
        RedisTier::<String, String>::builder()
            .url(server)
            .prefix(prefix)
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let db = FakeSource::new("db");
    let mut out = Vec::new();
    for url in urls {
        let memory = Arc::new(MemoryTier::new());
        let backplane = RedisBackplane::new(url, channel.clone()).unwrap();
        let cache = TieredCache::builder()
            .shared_tier(memory.clone(), None)
            .shared_tier(redis.clone(), Some(Duration::from_secs(1)))
            .source(db.clone())
            .backplane(Arc::new(backplane.clone()))
            .build()
            .unwrap();
        backplane.attach(&cache);
        out.push(Instance {
            cache,
            memory,
            backplane,
            channel: channel.clone(),
        });
    }
    (out, db)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn memory_version(i: &Instance, key: &str) -> Option<u64> {
    i.memory
        .get_stale(&key.to_string(), Duration::MAX)
        .await
        .unwrap()
        .map(|e| e.version)
}

fn k(s: &str) -> String {
    s.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_evicts_older_copies_from_every_other_instance() {
    let url = env::redis_url();
    let (all, _db) = instances("bp_update", &[url.clone(), url.clone(), url]).await;
    all[0]
        .cache
        .update(&k("a"), Arc::new("v1".into()))
        .await
        .unwrap();
    for i in &all {
        assert_eq!(i.cache.fetch(&k("a")).await.unwrap().version, 1);
    }
    all[0]
        .cache
        .update(&k("a"), Arc::new("v2".into()))
        .await
        .unwrap();
    for i in &all[1..] {
        // The message carried the value: the held copy was replaced, no Redis round trip.
        for _ in 0..500 {
            if memory_version(i, "a").await != Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let got = i.cache.fetch(&k("a")).await.unwrap();
        assert_eq!((got.version, got.origin), (2, Origin::Tier(0)));
    }
    assert_eq!(all[0].backplane.stats().received, 0, "own messages ignored");
    assert_eq!(all[0].backplane.stats().published, 2);
    wait_until("delivered", || all[1].backplane.stats().received >= 2).await;

    // Without the value (too large to carry), a held copy is evicted and re-read from Redis.
    all[0].backplane.set_carry_values_up_to(0);
    all[0]
        .cache
        .update(&k("a"), Arc::new("v3".into()))
        .await
        .unwrap();
    wait_until("delivered", || all[1].backplane.stats().received >= 3).await;
    let got = all[1].cache.fetch(&k("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (3, Origin::Tier(1)));

    // A manual invalidation reaches the others too.
    all[2].cache.invalidate(&k("a")).await.unwrap();
    wait_until("delivered", || all[1].backplane.stats().received >= 4).await;
    assert_eq!(memory_version(&all[1], "a").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_flushes_memory_when_it_comes_back() {
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let proxy = FaultProxy::start(&host).await;
    let through_proxy = format!("redis://{}/", proxy.addr());
    let (all, _db) = instances("bp_gap", &[server, through_proxy]).await;
    all[0]
        .cache
        .update(&k("a"), Arc::new("v1".into()))
        .await
        .unwrap();
    all[1].cache.get(&k("a")).await.unwrap();
    assert_eq!(memory_version(&all[1], "a").await, Some(1));

    // Instance 1 stops hearing; instance 0 updates meanwhile.
    proxy.set_mode(ProxyMode::Blackhole);
    proxy.kill_connections();
    wait_until("unsubscribed", || !all[1].backplane.is_subscribed()).await;
    all[0]
        .cache
        .update(&k("a"), Arc::new("v2".into()))
        .await
        .unwrap();
    assert_eq!(
        memory_version(&all[1], "a").await,
        Some(1),
        "missed the message"
    );

    // Back: instance 1 resubscribes and flushes what it could not trust.
    proxy.set_mode(ProxyMode::Pass);
    wait_until("resubscribed", || all[1].backplane.is_subscribed()).await;
    wait_until("flushed", || all[1].backplane.stats().gaps >= 1).await;
    assert_eq!(memory_version(&all[1], "a").await, None);
    assert_eq!(all[1].cache.fetch(&k("a")).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_subscription_is_noticed_by_its_health_check() {
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let proxy = FaultProxy::start(&host).await;
    let (all, _db) = instances("bp_health", &[format!("redis://{}/", proxy.addr())]).await;
    // The connection stays open but nothing comes back: only the PING notices.
    proxy.set_mode(ProxyMode::Blackhole);
    wait_until("noticed", || !all[0].backplane.is_subscribed()).await;
    proxy.set_mode(ProxyMode::Pass);
    wait_until("back", || all[0].backplane.is_subscribed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_retried_until_it_gets_through() {
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let proxy = FaultProxy::start(&host).await;
    let (all, _db) = instances("bp_retry", &[format!("redis://{}/", proxy.addr()), server]).await;
    all[0]
        .cache
        .update(&k("a"), Arc::new("v1".into()))
        .await
        .unwrap();
    all[1].cache.get(&k("a")).await.unwrap();
    all[0]
        .backplane
        .flush_queue(Duration::from_secs(2))
        .await
        .expect("version 1's message sent");
    // Instance 0's backplane loses Redis: its update's message cannot be sent.
    proxy.set_mode(ProxyMode::Reset);
    proxy.kill_connections();
    all[0]
        .cache
        .update(&k("a"), Arc::new("v2".into()))
        .await
        .unwrap();
    // The update did not wait for it: the message is queued and fails in the background.
    wait_until("failed", || all[0].backplane.stats().publish_errors >= 1).await;
    assert!(all[0].backplane.stats().queued >= 1);
    let unsent = all[0]
        .backplane
        .flush_queue(Duration::from_millis(50))
        .await;
    assert!(
        matches!(
            unsent,
            Err(tiercache_core::Error::Unfinished { pending: 1, .. })
        ),
        "{unsent:?}"
    );
    proxy.set_mode(ProxyMode::Pass);
    // Retried in the background: instance 1 drops version 1.
    wait_until("retried", || all[1].backplane.stats().received >= 2).await;
    assert_ne!(memory_version(&all[1], "a").await, Some(1));
    assert_eq!(all[1].cache.fetch(&k("a")).await.unwrap().version, 2);
    all[0]
        .backplane
        .flush_queue(Duration::from_secs(2))
        .await
        .expect("sent");
    assert_eq!(all[0].backplane.stats().queued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_subscription_flushes_what_was_filled_before_it() {
    let server = env::redis_url();
    let host = redis_env::host_of(&server);
    let proxy = FaultProxy::start(&host).await;
    // Instance 1's backplane cannot subscribe yet (a slow start, a far server).
    proxy.set_mode(ProxyMode::Blackhole);
    let urls = [server.clone(), format!("redis://{}/", proxy.addr())];
    let (all, _db) = instances_unwaited("bp_first", &urls).await;
    wait_until("subscribed", || all[0].backplane.is_subscribed()).await;
    all[0]
        .cache
        .update(&k("a"), Arc::new("v1".into()))
        .await
        .unwrap();
    all[1].cache.get(&k("a")).await.unwrap();
    assert_eq!(memory_version(&all[1], "a").await, Some(1));
    // Instance 0 updates before instance 1's first subscription: the message is not heard.
    all[0]
        .cache
        .update(&k("a"), Arc::new("v2".into()))
        .await
        .unwrap();
    all[0]
        .backplane
        .flush_queue(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(memory_version(&all[1], "a").await, Some(1));
    proxy.set_mode(ProxyMode::Pass);
    wait_until("subscribed", || all[1].backplane.is_subscribed()).await;
    // Flushed as the subscription came up.
    for _ in 0..500 {
        if memory_version(&all[1], "a").await != Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(memory_version(&all[1], "a").await, Some(1), "not flushed");
    assert_eq!(all[1].cache.fetch(&k("a")).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_chain_ends_its_subscription() {
    let url = env::redis_url();
    let (mut all, _db) = instances("bp_drop", &[url]).await;
    let channel = all[0].channel.clone();
    let mut raw = redis_env::redis_client()
        .await
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let subscribers = async |raw: &mut redis::aio::MultiplexedConnection| {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(raw)
            .await
            .unwrap();
        counts[0].1
    };
    assert_eq!(subscribers(&mut raw).await, 1);
    drop(all.pop());
    for _ in 0..500 {
        if subscribers(&mut raw).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the listener outlived its chain");
}
