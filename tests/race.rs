//! The race harness: several instances (each with its own memory tier) share a Redis-like tier
//! and a source, and invalidate each other through a backplane. Updaters, readers and manual
//! invalidations run concurrently while every tier call and every backplane message waits a
//! random time. After quiescence, every tier that holds a key holds the source's version.
//!
//! Each run is seeded and runs on tokio's paused clock in one thread, so a failing seed replays
//! exactly: `RACE_SEED=1234 cargo test --test race -- --nocapture`. The suite runs 10,000 seeds.

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{BreakerPolicy, CacheTier, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{BackplaneHub, FakeTier, Fault, FaultSwitch, Faulty};

const INSTANCES: usize = 3;
const KEYS: u64 = 2;
const OPS: usize = 6;
const RUNS_PER_TEST: u64 = 2_500;

type Memory = Faulty<Arc<MemoryTier<u64, String>>>;

struct Instance {
    cache: TieredCache<u64, String>,
    memory: Arc<MemoryTier<u64, String>>,
}

async fn run(seed: u64) {
    let jitter = |n: u64| {
        let switch = FaultSwitch::with_seed(seed.wrapping_mul(31).wrapping_add(n));
        switch.set(Fault::Jitter(Duration::from_millis(5)));
        switch
    };
    let redis = FakeTier::<u64, String>::cache("redis").with_faults(jitter(1));
    let db = FakeTier::<u64, String>::source("db").with_faults(jitter(2));
    let hub = BackplaneHub::new(seed);
    hub.set_max_delay(Duration::from_millis(5));

    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let memory = Arc::new(MemoryTier::builder().capacity(16).build().unwrap());
        let faulty: Memory = Faulty::with_switch(memory.clone(), jitter(10 + i as u64));
        let handle = hub.handle();
        let cache = TieredCache::builder()
            .tier_with_timeout(faulty, None)
            .tier_with_timeout(redis.clone(), None)
            .source_with_timeout(db.clone(), None)
            .breaker(BreakerPolicy::never())
            .backplane(Arc::new(handle.clone()))
            .build()
            .unwrap();
        handle.attach(cache.clone());
        instances.push(Instance { cache, memory });
    }

    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tasks = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for role in 0..2 {
            let cache = instance.cache.clone();
            let mut rng = fastrand::Rng::with_seed(rng.u64(..));
            tasks.push(tokio::spawn(async move {
                for op in 0..OPS {
                    let key = rng.u64(0..KEYS);
                    match (role, rng.u8(0..10)) {
                        (0, 0..=5) => {
                            let value = Arc::new(format!("{i}/{op}"));
                            cache.update(&key, value).await.unwrap();
                        }
                        (_, 9) => cache.invalidate(&key).await.unwrap(),
                        _ => {
                            cache.get(&key).await.unwrap();
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Quiescence: every delayed call and message has landed.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for key in 0..KEYS {
        // A key never written is version 0: a cached "not found" is right for it.
        let truth = db.version(&key).unwrap_or(0);
        if let Some(held) = redis.version(&key) {
            assert_eq!(
                held, truth,
                "seed {seed}: redis holds version {held} of key {key}"
            );
        }
        for (i, instance) in instances.iter().enumerate() {
            let held = instance
                .memory
                .get_stale(&key, Duration::MAX)
                .await
                .unwrap()
                .map(|e| e.version);
            if let Some(held) = held {
                assert_eq!(
                    held, truth,
                    "seed {seed}: instance {i}'s memory holds version {held} of key {key}"
                );
            }
            // And a read now returns the source's version.
            let got = instance.cache.fetch(&key).await.unwrap().version;
            assert_eq!(got, truth, "seed {seed}: instance {i} read {got}");
        }
    }
}

fn run_seeds(seeds: std::ops::Range<u64>) {
    let seeds: Vec<u64> = match std::env::var("RACE_SEED") {
        Ok(one) => vec![one.parse().expect("RACE_SEED is a number")],
        Err(_) => seeds.collect(),
    };
    for seed in seeds {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(seed));
    }
}

#[test]
fn race_seeds_0_to_2499() {
    run_seeds(0..RUNS_PER_TEST);
}

#[test]
fn race_seeds_2500_to_4999() {
    run_seeds(RUNS_PER_TEST..2 * RUNS_PER_TEST);
}

#[test]
fn race_seeds_5000_to_7499() {
    run_seeds(2 * RUNS_PER_TEST..3 * RUNS_PER_TEST);
}

#[test]
fn race_seeds_7500_to_9999() {
    run_seeds(3 * RUNS_PER_TEST..4 * RUNS_PER_TEST);
}
