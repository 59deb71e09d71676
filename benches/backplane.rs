//! Cross-instance invalidation latency, tiercache against the `multi-tier-cache` crate, in one
//! run on the same Redis: four instances in one process; instance 0 updates a key the other
//! three hold in memory; the time from the update returning until every other instance serves
//! the new value.
//!
//! ```text
//! cargo bench --bench backplane            # 300 rounds each; REDIS_URL or the local Redis
//! cargo bench --bench backplane -- 1000    # rounds
//! ```
//!
//! Each other instance polls its cache (yielding to the OS and to tokio between reads) from the
//! moment the update returns; a round's latency is the slowest instance's. Both libraries are
//! measured the same way, alternately, so the machine's noise falls on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use multi_tier_cache::{
    Bytes, CacheManager, InvalidationConfig, MokaCache, MokaCacheConfig, RedisCache,
};
use tiercache_core::TieredCache;
use tiercache_memory::MemoryTier;
use tiercache_redis::{RedisBackplane, RedisTier};
use tiercache_testkit::{FakeSource, env};

const INSTANCES: usize = 4;

fn percentiles(samples: Vec<Duration>) -> String {
    let samples = tiercache_testkit::Samples::new(samples);
    let at = |p: f64| samples.at(p);
    format!(
        "p50 {:>8.1?}  p90 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}  ({} rounds)",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

/// Between two polls: the thread's time slice to the OS, then the task's turn to tokio. Three
/// pollers spinning on tokio's two workers alone would keep both cores busy on a two-core
/// machine, and `redis-server` (which must run to deliver the message) would wait for one for
/// up to a scheduler time slice: that put 1-5 ms rounds into 1-2% of either library's samples.
async fn yield_now() {
    std::thread::yield_now();
    tokio::task::yield_now().await;
}

async fn tiercache_round(
    instances: &[TieredCache<String, String>],
    key: &String,
    round: u64,
) -> Duration {
    for i in &instances[1..] {
        i.get(key).await.unwrap(); // every other instance holds the current version
    }
    let version = instances[0]
        .update(key, Arc::new(format!("value {round}")))
        .await
        .unwrap();
    let returned = Instant::now();
    let mut waits = Vec::new();
    for i in &instances[1..] {
        let i = i.clone();
        let key = key.clone();
        waits.push(tokio::spawn(async move {
            while i.fetch(&key).await.unwrap().version < version {
                yield_now().await;
            }
            returned.elapsed()
        }));
    }
    let mut slowest = Duration::ZERO;
    for w in waits {
        slowest = slowest.max(w.await.unwrap());
    }
    slowest
}

async fn multi_tier_round(instances: &[Arc<CacheManager>], key: &str, round: u64) -> Duration {
    for i in &instances[1..] {
        i.get(key).await.unwrap();
    }
    let value = Bytes::from(format!("value {round}"));
    instances[0]
        .update_cache(key, value.clone(), None)
        .await
        .unwrap();
    let returned = Instant::now();
    let mut waits = Vec::new();
    for i in &instances[1..] {
        let (i, key, value) = (Arc::clone(i), key.to_owned(), value.clone());
        waits.push(tokio::spawn(async move {
            while i.get(&key).await.unwrap().as_ref() != Some(&value) {
                yield_now().await;
            }
            returned.elapsed()
        }));
    }
    let mut slowest = Duration::ZERO;
    for w in waits {
        slowest = slowest.max(w.await.unwrap());
    }
    slowest
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let url = env::redis_url();
    let run = env::unique_name("backplane_bench");

    // tiercache: memory over a shared Redis tier over an in-process source, one backplane each.
    let redis = Arc::new(
        RedisTier::<String, String>::builder()
            .url(url.clone())
            .prefix(format!("{run}:tc:"))
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
    );
    let db = FakeSource::new("db");
    let mut ours = Vec::new();
    let mut backplanes = Vec::new();
    for _ in 0..INSTANCES {
        let backplane = RedisBackplane::new(&url, format!("{run}:tc:invalidations")).unwrap();
        let chain = TieredCache::builder()
            .tier(MemoryTier::<String, String>::new())
            .shared_tier(redis.clone(), Some(Duration::from_secs(1)))
            .source(db.clone())
            .backplane(Arc::new(backplane.clone()))
            .build()
            .unwrap();
        backplane.attach(&chain);
        ours.push(chain);
        backplanes.push(backplane);
    }
    while !backplanes.iter().all(RedisBackplane::is_subscribed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // multi-tier-cache: moka over Redis, with its pub/sub invalidation.
    let mut theirs = Vec::new();
    for _ in 0..INSTANCES {
        let l1 = Arc::new(MokaCache::new(MokaCacheConfig::default()).unwrap());
        let l2 = Arc::new(RedisCache::with_url(&url).await.unwrap());
        let config = InvalidationConfig {
            channel: format!("{run}:mtc:invalidations"),
            ..InvalidationConfig::default()
        };
        theirs.push(Arc::new(
            CacheManager::new_with_invalidation(l1, l2, &url, config)
                .await
                .unwrap(),
        ));
    }
    let their_key = format!("{run}:mtc:key");
    theirs[0]
        .update_cache(&their_key, Bytes::from("initial"), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // let their subscribers settle

    let our_key = "key".to_string();
    let (mut ours_ms, mut theirs_ms) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        ours_ms.push(tiercache_round(&ours, &our_key, round).await);
        theirs_ms.push(multi_tier_round(&theirs, &their_key, round).await);
    }
    println!(
        "cross-instance invalidation, {INSTANCES} instances, update returned -> all others serve the new value"
    );
    println!("tiercache         {}", percentiles(ours_ms));
    println!("multi-tier-cache  {}", percentiles(theirs_ms));
    let _ = tiercache_core::CacheTier::clear(&*redis).await;
}
