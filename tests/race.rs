//! The race harness: several instances (each with its own small memory tier, so entries and
//! tombstones get evicted) share a Redis-like tier and a source, and tell each other of changes
//! through a backplane. Updaters, readers and manual invalidations run concurrently while
//! every tier call and every backplane message waits a random time, and:
//!
//! * any caller may give up at any `.await` (a short random `timeout`, or a `select!` against a
//!   random sleep), an update's caller too, before or after its write reached the source;
//! * the tiers and the source fail and recover at random (errors, hangs, slowness), with
//!   circuit breakers on;
//! * a write may commit in the source after the chain gave up on it (its statement kept
//!   running), within the chain's `write_settle`;
//! * some runs fill the lower tiers in the background, and some instances' memory answers
//!   through its synchronous path (no faults injected there).
//!
//! Then, faults cleared, every key gets one last write whose caller may give up on it, while
//! others read it; and then a change behind the caches' back, invalidated by hand on an
//! instance that reads the key meanwhile. After everything has settled: every tier holds the source's
//! version of each key or nothing, every read returns the source's version, every breaker has
//! closed, and no load, replay or background task is left.
//!
//! Each run is seeded and runs on tokio's paused clock in one thread, so a failing seed replays
//! exactly: `RACE_SEED=1234 cargo test --test race -- --nocapture` (it replaces the seed ranges
//! and says so). The suite runs 10,000 seeds.

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::async_trait;
use tiercache_core::{
    BreakerPolicy, CacheTier, Entry, Error, Result, Source, TierStats, TieredCache, Version,
    Written,
};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{BackplaneHub, FakeSource, FakeTier, Fault, FaultSwitch, Faulty, Op};

const INSTANCES: usize = 3;
const KEYS: u64 = 4;
const OPS: usize = 8;
const RUNS_PER_TEST: u64 = 2_500;
/// Longest a write's commit may lag behind the call that sent it.
const COMMIT_LAG: Duration = Duration::from_millis(25);
/// The chain's source limit: shorter than the lag, so that some writes commit after it.
const SOURCE_LIMIT: Duration = Duration::from_millis(15);
/// Longer than the lag: a settled write has committed, or never will.
const WRITE_SETTLE: Duration = Duration::from_millis(40);

/// The source as a database server is: a write the chain gave up on goes on and commits up to
/// [`COMMIT_LAG`] later; faults stop a call before it reaches the data.
#[derive(Clone)]
struct Database {
    data: FakeSource<u64, String>,
    faults: FaultSwitch,
    lag: Arc<std::sync::Mutex<fastrand::Rng>>,
}

#[async_trait]
impl Source<u64, String> for Database {
    fn name(&self) -> &str {
        "db"
    }
    async fn get(&self, key: &u64) -> Result<Option<Entry<String>>> {
        self.faults.run("db", Op::Get, self.data.get(key)).await
    }
    async fn get_many(&self, keys: &[u64]) -> Result<Vec<Option<Entry<String>>>> {
        self.faults
            .run("db", Op::Get, self.data.get_many(keys))
            .await
    }
    async fn write(
        &self,
        key: &u64,
        value: Arc<String>,
        expected: Option<Version>,
    ) -> Result<Written> {
        let lag = COMMIT_LAG.mul_f64(self.lag.lock().unwrap().f64());
        let (data, key) = (self.data.clone(), *key);
        let send = async move {
            let commit = tokio::spawn(async move {
                tokio::time::sleep(lag).await;
                data.write(&key, value, expected).await
            });
            commit.await.expect("the commit ran")
        };
        self.faults.run("db", Op::Write, send).await
    }
    async fn delete(&self, _: &u64, _: Option<Version>) -> Result<Written> {
        Err(Error::unsupported("db", "delete"))
    }
    fn stats(&self) -> TierStats {
        self.data.stats()
    }
}

struct Instance {
    cache: TieredCache<u64, String>,
    memory: Arc<MemoryTier<u64, String>>,
    faults: FaultSwitch,
}

/// Runs `op`, or gives up on it part way, as callers do.
async fn maybe_give_up<T>(rng: &mut fastrand::Rng, op: impl Future<Output = T>) -> Option<T> {
    match rng.u8(0..6) {
        0 => tokio::time::timeout(Duration::from_micros(rng.u64(0..4_000)), op)
            .await
            .ok(),
        1 => {
            let patience = tokio::time::sleep(Duration::from_micros(rng.u64(0..4_000)));
            tokio::select! {
                done = op => Some(done),
                () = patience => None,
            }
        }
        _ => Some(op.await),
    }
}

/// The fault a chaos step turns on: mostly slowness, sometimes errors or hangs, or none.
fn chaos(rng: &mut fastrand::Rng) -> Option<Fault> {
    match rng.u8(0..10) {
        0..=2 => Some(Fault::Error),
        3 => Some(Fault::Hang),
        4..=6 => Some(Fault::Jitter(Duration::from_millis(5))),
        _ => None,
    }
}

fn base(switch: &FaultSwitch, jitter: bool) {
    switch.clear();
    if jitter {
        switch.set(Fault::Jitter(Duration::from_millis(5)));
    }
}

async fn run(seed: u64) {
    // The core's own randomness (replay back-off jitter) comes from this thread's generator.
    fastrand::seed(seed);
    let mut rng = fastrand::Rng::with_seed(seed);
    let switch = |n: u64| FaultSwitch::with_seed(seed.wrapping_mul(31).wrapping_add(n));
    let redis_faults = switch(1);
    base(&redis_faults, true);
    let redis = FakeTier::<u64, String>::cache("redis").with_faults(redis_faults.clone());
    let db = Database {
        data: FakeSource::new("db"),
        faults: switch(2),
        lag: Arc::new(std::sync::Mutex::new(fastrand::Rng::with_seed(
            seed ^ 0x5eed,
        ))),
    };
    base(&db.faults, true);
    let hub = BackplaneHub::new(seed);
    hub.set_max_delay(Duration::from_millis(5));
    let background = rng.bool();

    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        // Three entries for four keys (and their tombstones): the LRU evicts all the time.
        let memory = Arc::new(MemoryTier::builder().capacity(3).shards(1).build().unwrap());
        let faults = switch(10 + i as u64);
        // Instance 0's memory answers through its synchronous path (no fault is ever set on it).
        let jittery = i != 0;
        base(&faults, jittery);
        let handle = hub.handle();
        let cache = TieredCache::builder()
            .tier_with_timeout(
                Faulty::with_switch(memory.clone(), faults.clone()),
                Some(Duration::from_millis(10)),
            )
            .tier_with_timeout(redis.clone(), Some(Duration::from_millis(10)))
            .source_with_timeout(db.clone(), Some(SOURCE_LIMIT))
            .breaker(BreakerPolicy {
                threshold: 2,
                cooldown: Duration::from_millis(5),
            })
            .background_backfill(background)
            .write_settle(WRITE_SETTLE)
            .max_pending_repairs(3)
            .backplane(Arc::new(handle.clone()))
            .build()
            .unwrap();
        handle.attach(cache.clone());
        instances.push(Instance {
            cache,
            memory,
            faults,
        });
    }

    let mut tasks = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for role in 0..2 {
            let cache = instance.cache.clone();
            let mut rng = fastrand::Rng::with_seed(rng.u64(..));
            tasks.push(tokio::spawn(async move {
                for op in 0..OPS {
                    let key = rng.u64(0..KEYS);
                    let choice = rng.u8(0..20);
                    let rng = &mut rng;
                    match (role, choice) {
                        (0, 0..=10) => {
                            let value = Arc::new(format!("{i}/{op}"));
                            maybe_give_up(rng, cache.update(&key, value)).await;
                        }
                        (_, 18) => {
                            maybe_give_up(rng, cache.invalidate(&key)).await;
                        }
                        (_, 19) => {
                            maybe_give_up(rng, cache.get_many(&[key, (key + 1) % KEYS])).await;
                        }
                        _ => {
                            maybe_give_up(rng, cache.get(&key)).await;
                        }
                    }
                }
            }));
        }
    }
    // Faults come and go while the work runs: mostly in the caches, sometimes in the source.
    let caches: Vec<FaultSwitch> = std::iter::once(redis_faults.clone())
        .chain(instances.iter().skip(1).map(|i| i.faults.clone()))
        .collect();
    let chaos_caches = caches.clone();
    let chaos_db = db.faults.clone();
    let mut chaos_rng = fastrand::Rng::with_seed(rng.u64(..));
    let chaos_task = tokio::spawn(async move {
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_micros(chaos_rng.u64(0..8_000))).await;
            let target = if chaos_rng.u8(0..5) == 0 {
                &chaos_db
            } else {
                &chaos_caches[chaos_rng.usize(0..chaos_caches.len())]
            };
            match chaos(&mut chaos_rng) {
                Some(fault) => target.set(fault),
                None => base(target, true),
            }
        }
    });
    for t in tasks {
        t.await.unwrap();
    }
    chaos_task.await.unwrap();
    for target in caches.iter().chain(std::iter::once(&db.faults)) {
        base(target, true);
    }
    // A last round on the keys every instance now reads: each key's last write may be given
    // up by its caller, before or after it reached the source, while the others read.
    let mut last = Vec::new();
    for key in 0..KEYS {
        for instance in &instances {
            let _ = instance.cache.get(&key).await;
        }
        let writer = instances[rng.usize(0..INSTANCES)].cache.clone();
        let reader = instances[rng.usize(0..INSTANCES)].cache.clone();
        let mut task_rng = fastrand::Rng::with_seed(rng.u64(..));
        last.push(tokio::spawn(async move {
            let value = Arc::new(format!("last/{key}"));
            let patience = Duration::from_micros(task_rng.u64(0..30_000));
            let _ = tokio::time::timeout(patience, writer.update(&key, value)).await;
        }));
        last.push(tokio::spawn(async move {
            for _ in 0..3 {
                let _ = reader.get(&key).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for t in last {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Then each key is changed behind the caches' back and invalidated by hand on one
    // instance while that instance reads it.
    for key in 0..KEYS {
        let i = rng.usize(0..INSTANCES);
        let _ = instances[i].cache.get(&key).await;
        // (No fill of this instance is still on its way: the rule below is about the order
        // of the invalidation, which the second pass would otherwise hide.)
        instances[i]
            .cache
            .flush(Duration::from_secs(1))
            .await
            .unwrap();
        let edited = db.data.put(key, format!("edited/{key}"));
        let (cache, reader) = (instances[i].cache.clone(), instances[i].cache.clone());
        let invalidation = tokio::spawn(async move { cache.invalidate(&key).await });
        let reads = tokio::spawn(async move {
            for _ in 0..4 {
                let _ = reader.get(&key).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        invalidation.await.unwrap().unwrap();
        // Once the invalidation returns, this instance reads the edit, whatever its reader
        // did meanwhile.
        let mut answer = instances[i].cache.fetch(&key).await;
        while let Err(e) = &answer {
            // The source's breaker may still wait for its probe (the reader has it).
            assert!(e.is_transient(), "seed {seed}: {e}");
            tokio::time::sleep(Duration::from_millis(1)).await;
            answer = instances[i].cache.fetch(&key).await;
        }
        let got = answer.unwrap().version;
        assert_eq!(
            got, edited,
            "seed {seed}: instance {i} read {got} of key {key} after invalidating it"
        );
        reads.await.unwrap();
    }
    // Quiescence: delayed calls and messages have landed, writes settled, replays done,
    // breakers past their cool-down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, instance) in instances.iter().enumerate() {
        // A read of a key never used reaches every tier: an open breaker gets its probe.
        instance.cache.get(&(KEYS + i as u64)).await.unwrap();
        instance
            .cache
            .flush(Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: instance {i} left work undone: {e}"));
    }

    for key in 0..KEYS {
        // A key never written is version 0: a cached "not found" is right for it.
        let truth = db.data.version(&key).unwrap_or(0);
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
    for (i, instance) in instances.iter().enumerate() {
        // The reads above may have started background fills.
        instance.cache.flush(Duration::from_secs(2)).await.unwrap();
        let stats = instance.cache.stats();
        for tier in stats.tiers.iter().chain(std::iter::once(&stats.source)) {
            assert!(
                !tier.breaker_open,
                "seed {seed}: instance {i}'s breaker on {} is still open",
                tier.name
            );
            assert_eq!(
                tier.pending_repairs, 0,
                "seed {seed}: instance {i} has replays left on {}",
                tier.name
            );
        }
        assert_eq!(stats.loads_in_flight, 0, "seed {seed}: instance {i}");
        assert_eq!(stats.background_tasks, 0, "seed {seed}: instance {i}");
    }
}

fn run_seeds(seeds: std::ops::Range<u64>) {
    let seeds: Vec<u64> = match std::env::var("RACE_SEED") {
        Ok(one) => {
            eprintln!("RACE_SEED={one}: running that seed instead of {seeds:?}");
            vec![one.parse().expect("RACE_SEED is a number")]
        }
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
