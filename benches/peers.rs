//! tiercache against its peers, in one run on the same local Redis. Three contenders, each a
//! memory tier over Redis over an in-process source:
//!
//! * `tiercache`: `TieredCache` with `MemoryTier` over `RedisTier` (MessagePack, its default).
//! * `tiercache_moka`: the same chain with `moka::sync::Cache` as the memory tier (`MokaTier`
//!   below, an adapter with a synchronous `peek` like `MemoryTier`'s).
//! * `multi_tier_cache`: the `multi-tier-cache` crate's `CacheManager` over its `MokaCache`
//!   (`moka::future`) and `RedisCache`, built as `benches/backplane.rs` builds it (without the
//!   pub/sub invalidation: no contender here has a backplane). Its typed API
//!   (`get_typed`, `get_or_compute_typed`) with its default serializer, JSON.
//!
//! Scenarios:
//!
//! * `peers/memory_hit`: 500 keys (`user-00000042`), every one in every contender's memory tier,
//!   visited in a fixed shuffled order on one thread. `multi_tier_cache_bytes` is its untyped
//!   `get`, returning the stored JSON bytes: its L1 holds bytes, so the typed hit (the same value
//!   type as the others, `UserConfig`) decodes JSON on every hit, and the bytes row shows that
//!   share.
//! * `peers/redis_hit`: the same 500 keys, held in Redis but not in memory: before each timed get
//!   the key is removed from the contender's memory tier (`CacheTier::invalidate` on ours,
//!   `CacheBackend::remove` on their `MokaCache`), outside the timed part. The get then reads
//!   Redis, decodes, and fills memory (tiercache always back-fills; multi-tier-cache promotes a
//!   Redis hit to memory with probability 1/10). `tiercache_json` is `tiercache` with the JSON
//!   codec, the same payload format as multi-tier-cache.
//! * cold-key stampede (a measured loop, printed): 1,000 tokio tasks released together ask for a
//!   key no tier holds; the source takes 5 ms per load and counts its loads. Per contender: the
//!   wall time from the release until all 1,000 have the value, and the source loads. 20 rounds,
//!   a fresh key each, contenders alternating round by round so the machine's noise falls on all.
//!   multi-tier-cache's get-or-compute is `get_or_compute_typed`, its loader calling the same
//!   kind of source.
//!
//! ```text
//! cargo bench --bench peers          # needs Redis (REDIS_URL, default the local one)
//! ```
//!
//! Made equal: the value (`userconfig::UserConfig`, about 2.7 KB of JSON and 2.5 KB of
//! MessagePack, printed at the start), the Redis server, the key set and visiting order, the
//! memory capacity (1,000 entries, twice the keys, so that no contender's admission or sharding
//! turns a key away) and TTL (5 minutes), the Redis TTL (30 minutes), one tokio multi-thread
//! runtime with two workers (memory hits run on the bench's thread inside `block_on`), and a 1 s
//! time limit on our Redis tier (theirs has none).
//! Each contender has its own Redis key prefix (`redis_env::unique_prefix`), removed at the end.
//!
//! Not equal, by design of the peers:
//!
//! * multi-tier-cache's L1 stores serialized bytes, ours stores the decoded value (`Arc`).
//! * multi-tier-cache has no key prefix: the bench prepends one and builds those keys once,
//!   outside the timed loops (a small advantage to it: tiercache's Redis tier builds its Redis
//!   key on each call).
//! * Its Redis read is GET + PTTL in one pipeline; ours is one GET (the envelope carries the
//!   expiry). Its write is PSETEX; ours a Lua script that checks versions.
//! * `MokaTier` keeps no tombstones (invalidate just removes): enough for these reads, not a
//!   production adapter.

use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use moka::ops::compute::{CompResult, Op as MokaOp};
use multi_tier_cache::{
    CacheBackend, CacheError, CacheManager, CacheResult, CacheStrategy, MokaCache, MokaCacheConfig,
    RedisCache,
};
use tiercache_core::async_trait;
use tiercache_core::{
    CacheTier, Clock, Counter, Entry, Origin, Peek, Result, TierStats, TieredCache, Version,
};
use tiercache_memory::MemoryTier;
use tiercache_redis::RedisTier;
use tiercache_redis::envelope::Codec;
use tiercache_testkit::{FakeSource, Fault, Op, env, redis_env};
use userconfig::UserConfig;

/// Keys in the hit scenarios.
const KEYS: usize = 500;
/// Memory capacity of every contender.
const ROOM: usize = 2 * KEYS;
const MEMORY_TTL: Duration = Duration::from_secs(300);
const REDIS_TTL: Duration = Duration::from_secs(1800);
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
const STAMPEDE_TASKS: usize = 1_000;
const STAMPEDE_ROUNDS: usize = 20;
const LOAD_TIME: Duration = Duration::from_millis(5);

type Source = FakeSource<String, UserConfig>;

/// `tiercache_core::CacheTier` on `moka::sync::Cache`: a synchronous `peek`, versions honoured
/// minimally (a set older than the held entry is refused), invalidation removes (no tombstones).
struct MokaTier<V> {
    cache: moka::sync::Cache<String, Entry<V>>,
    capacity: u64,
    ttl: Duration,
    clock: Clock,
    hits: Counter,
    misses: Counter,
}

impl<V: Send + Sync + 'static> MokaTier<V> {
    fn new(capacity: u64, ttl: Duration) -> Self {
        MokaTier {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            capacity,
            ttl,
            clock: Clock::system(),
            hits: Counter::default(),
            misses: Counter::default(),
        }
    }
}

#[async_trait]
impl<V: Send + Sync + 'static> CacheTier<String, V> for MokaTier<V> {
    fn name(&self) -> &str {
        "moka"
    }

    #[inline]
    fn peek(&self, key: &String) -> Peek<V> {
        match self.cache.get(key) {
            Some(entry) if !entry.is_expired(self.clock.now()) => {
                self.hits.incr();
                Peek::Hit(entry)
            }
            _ => {
                self.misses.incr();
                Peek::Miss
            }
        }
    }

    async fn get(&self, key: &String) -> Result<Option<Entry<V>>> {
        Ok(match self.peek(key) {
            Peek::Hit(entry) => Some(entry),
            Peek::Miss | Peek::Unsupported => None,
        })
    }

    async fn set(&self, key: &String, entry: Entry<V>) -> Result<bool> {
        let now = self.clock.now();
        let expires_at = entry.capped_expiry(now, self.ttl);
        if expires_at <= now {
            return Ok(false);
        }
        let entry = entry.expiring_at(expires_at);
        let version = entry.version;
        let result = self
            .cache
            .entry_by_ref(key)
            .and_compute_with(|held| match held {
                Some(held) if held.value().version > version => MokaOp::Nop,
                _ => MokaOp::Put(entry),
            });
        Ok(matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ))
    }

    async fn invalidate(&self, key: &String, _version: Option<Version>) -> Result<()> {
        self.cache.invalidate(key);
        Ok(())
    }

    async fn clear(&self) -> Result<()> {
        self.cache.invalidate_all();
        Ok(())
    }

    fn stats(&self) -> TierStats {
        TierStats::new("moka", self.hits.get(), self.misses.get())
            .with_size(self.cache.entry_count(), Some(self.capacity))
    }
}

/// One of our chains, with handles on its memory tier, its Redis tier and its source.
struct Ours {
    chain: TieredCache<String, UserConfig>,
    memory: Arc<dyn CacheTier<String, UserConfig>>,
    redis: Arc<RedisTier<String, UserConfig>>,
    source: Source,
}

/// multi-tier-cache, with handles on its tiers, its key prefix and its source.
struct Theirs {
    manager: Arc<CacheManager>,
    l1: Arc<MokaCache>,
    l2: Arc<RedisCache>,
    prefix: String,
    source: Source,
}

impl Theirs {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn strategy() -> CacheStrategy {
    CacheStrategy::Custom(REDIS_TTL)
}

/// multi-tier-cache's loader: the source's value, as its `get_or_compute_typed` wants it.
async fn their_load(source: &Source, key: &str) -> CacheResult<UserConfig> {
    match tiercache_core::Source::get(source, &key.to_owned()).await {
        Ok(Some(Entry { value: Some(v), .. })) => Ok((*v).clone()),
        Ok(_) => Err(CacheError::NotFound),
        Err(e) => Err(CacheError::BackendError(e.to_string())),
    }
}

/// A realistic configuration: the defaults plus a long negative prompt, about 2.7 KB as JSON.
fn profile(user: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = "dark".into();
    c.preferences.language = "en-GB".into();
    c.image_generation.storage_directory = format!("/var/lib/images/{user}");
    c.image_generation.negative_prompt = "blurry, low quality, extra fingers, watermark, \
        jpeg artifacts, oversaturated, cropped, out of frame, duplicate, deformed, "
        .repeat(4);
    c
}

fn keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..KEYS).map(|i| format!("user-{i:08}")).collect();
    fastrand::Rng::with_seed(7).shuffle(&mut keys);
    keys
}

fn source_with(keys: &[String]) -> Source {
    let source = FakeSource::new("db");
    for k in keys {
        source.put(k.clone(), profile(k));
    }
    source
}

fn ours(
    url: &str,
    tag: &str,
    memory: Arc<dyn CacheTier<String, UserConfig>>,
    codec: Codec,
    keys: &[String],
) -> Ours {
    let redis = Arc::new(
        RedisTier::<String, UserConfig>::builder()
            .url(url)
            .prefix(redis_env::unique_prefix(tag))
            .ttl(REDIS_TTL)
            .timeout(REDIS_TIMEOUT)
            .codec(codec)
            .build()
            .unwrap(),
    );
    let source = source_with(keys);
    let chain = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .shared_tier(redis.clone(), Some(REDIS_TIMEOUT))
        .source(source.clone())
        .build()
        .unwrap();
    Ours {
        chain,
        memory,
        redis,
        source,
    }
}

async fn theirs(url: &str, keys: &[String]) -> Theirs {
    let l1 = Arc::new(
        MokaCache::new(MokaCacheConfig {
            max_capacity: ROOM as u64,
            time_to_live: MEMORY_TTL,
            time_to_idle: MEMORY_TTL,
        })
        .unwrap(),
    );
    let l2 = Arc::new(RedisCache::with_url(url).await.unwrap());
    let manager = Arc::new(CacheManager::new(l1.clone(), l2.clone()).await.unwrap());
    Theirs {
        manager,
        l1,
        l2,
        prefix: redis_env::unique_prefix("peers_mtc"),
        source: source_with(keys),
    }
}

fn memory_tier() -> Arc<dyn CacheTier<String, UserConfig>> {
    Arc::new(
        MemoryTier::<String, UserConfig>::builder()
            .capacity(ROOM)
            .ttl(MEMORY_TTL)
            .build()
            .unwrap(),
    )
}

/// Every contender reads every key once through its read path (source load, Redis and memory
/// filled), then every key must be a memory hit.
async fn warm(ours: &[&Ours], theirs: &Theirs, keys: &[String]) {
    for o in ours {
        for k in keys {
            o.chain
                .get(k)
                .await
                .unwrap()
                .expect("the source holds every key");
        }
        for k in keys {
            let f = o.chain.fetch(k).await.unwrap();
            assert_eq!(f.origin, Origin::Tier(0), "memory must hold every key");
        }
    }
    for k in keys {
        let source = &theirs.source;
        theirs
            .manager
            .get_or_compute_typed(&theirs.key(k), strategy(), || their_load(source, k))
            .await
            .unwrap();
    }
    let before = theirs.manager.get_stats();
    for k in keys {
        let got: Option<UserConfig> = theirs.manager.get_typed(&theirs.key(k)).await.unwrap();
        assert!(got.is_some(), "multi-tier-cache must hold every key");
    }
    let after = theirs.manager.get_stats();
    assert_eq!(
        after.l1_hits - before.l1_hits,
        KEYS as u64,
        "multi-tier-cache's memory must hold every key"
    );
}

fn percentiles(samples: Vec<Duration>) -> String {
    let samples = tiercache_testkit::Samples::new(samples);
    let at = |p: f64| samples.at(p);
    format!(
        "p50 {:>8.2?}  p90 {:>8.2?}  max {:>8.2?}",
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

/// Releases `STAMPEDE_TASKS` tasks together, each calling `get` once; returns the wall time
/// from the release until the last one has its value.
async fn stampede<F, Fut>(get: F) -> Duration
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let get = Arc::new(get);
    let barrier = Arc::new(tokio::sync::Barrier::new(STAMPEDE_TASKS + 1));
    let handles: Vec<_> = (0..STAMPEDE_TASKS)
        .map(|_| {
            let (get, barrier) = (Arc::clone(&get), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                get().await;
                Instant::now()
            })
        })
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut last = start;
    for h in handles {
        last = last.max(h.await.unwrap());
    }
    last - start
}

/// One contender's stampede figures.
#[derive(Default)]
struct Rounds {
    walls: Vec<Duration>,
    loads: Vec<u64>,
}

impl Rounds {
    fn report(&self, name: &str) {
        let mut loads = self.loads.clone();
        loads.sort_unstable();
        println!(
            "{name:<18} wall {}   source loads per round: min {} median {} max {} (total {} in {} rounds)",
            percentiles(self.walls.clone()),
            loads[0],
            loads[loads.len() / 2],
            loads[loads.len() - 1],
            loads.iter().sum::<u64>(),
            loads.len()
        );
    }
}

async fn our_stampede(o: &Ours, key: &str) -> (Duration, u64) {
    o.source.put(key.to_owned(), profile(key));
    let before = o.source.calls().get;
    let (chain, key) = (o.chain.clone(), key.to_owned());
    let wall = stampede(move || {
        let (chain, key) = (chain.clone(), key.clone());
        async move {
            black_box(chain.get(&key).await.unwrap().expect("found"));
        }
    })
    .await;
    (wall, o.source.calls().get - before)
}

async fn their_stampede(t: &Theirs, key: &str) -> (Duration, u64) {
    t.source.put(key.to_owned(), profile(key));
    let before = t.source.calls().get;
    let (manager, source) = (Arc::clone(&t.manager), t.source.clone());
    let (cache_key, key) = (t.key(key), key.to_owned());
    let wall = stampede(move || {
        let (manager, source) = (Arc::clone(&manager), source.clone());
        let (cache_key, key) = (cache_key.clone(), key.clone());
        async move {
            let value: UserConfig = manager
                .get_or_compute_typed(&cache_key, strategy(), || their_load(&source, &key))
                .await
                .unwrap();
            black_box(value);
        }
    })
    .await;
    (wall, t.source.calls().get - before)
}

fn bench_peers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(redis_env::redis_url()); // panics, naming REDIS_URL, if unreachable
    let keys = keys();
    let moka_tier: Arc<dyn CacheTier<String, UserConfig>> =
        Arc::new(MokaTier::<UserConfig>::new(ROOM as u64, MEMORY_TTL));
    let tc = ours(&url, "peers_tc", memory_tier(), Codec::MessagePack, &keys);
    let tc_json = ours(&url, "peers_tc_json", memory_tier(), Codec::Json, &keys);
    let tc_moka = ours(&url, "peers_tc_moka", moka_tier, Codec::MessagePack, &keys);
    let mtc = rt.block_on(theirs(&url, &keys));
    rt.block_on(warm(&[&tc, &tc_json, &tc_moka], &mtc, &keys));

    let sample = profile(&keys[0]);
    println!(
        "value: UserConfig, {} bytes as JSON, {} as MessagePack; {KEYS} keys; redis {}",
        serde_json::to_vec(&sample).unwrap().len(),
        rmp_serde::to_vec_named(&sample).unwrap().len(),
        env::redis_url()
    );
    let their_keys: Vec<String> = keys.iter().map(|k| mtc.key(k)).collect();
    let n = keys.len();

    // a. Memory hit, one thread.
    let mut group = c.benchmark_group("peers/memory_hit");
    group.throughput(criterion::Throughput::Elements(1));
    for (name, o) in [("tiercache", &tc), ("tiercache_moka", &tc_moka)] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        black_box(o.chain.get(&keys[i % n]).await.unwrap());
                    }
                    start.elapsed()
                })
            })
        });
    }
    let manager = &mtc.manager;
    group.bench_function(BenchmarkId::from_parameter("multi_tier_cache"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters as usize {
                    let v: Option<UserConfig> =
                        manager.get_typed(&their_keys[i % n]).await.unwrap();
                    black_box(v);
                }
                start.elapsed()
            })
        })
    });
    group.bench_function(BenchmarkId::from_parameter("multi_tier_cache_bytes"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters as usize {
                    black_box(manager.get(&their_keys[i % n]).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    group.finish();

    // b. Redis hit: memory emptied of the key before each (untimed) get.
    let mut group = c.benchmark_group("peers/redis_hit");
    group.throughput(criterion::Throughput::Elements(1));
    for (name, o) in [
        ("tiercache", &tc),
        ("tiercache_json", &tc_json),
        ("tiercache_moka", &tc_moka),
    ] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for i in 0..iters as usize {
                        let k = &keys[i % n];
                        o.memory.invalidate(k, None).await.unwrap();
                        let start = Instant::now();
                        let f = o.chain.fetch(k).await.unwrap();
                        total += start.elapsed();
                        assert_eq!(f.origin, Origin::Tier(1), "a Redis hit");
                        black_box(f);
                    }
                    total
                })
            })
        });
    }
    let their_before = manager.get_stats();
    group.bench_function(BenchmarkId::from_parameter("multi_tier_cache"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for i in 0..iters as usize {
                    let k = &their_keys[i % n];
                    mtc.l1.remove(k).await.unwrap();
                    let start = Instant::now();
                    let v: Option<UserConfig> = manager.get_typed(k).await.unwrap();
                    total += start.elapsed();
                    assert!(v.is_some(), "a Redis hit");
                    black_box(v);
                }
                total
            })
        })
    });
    group.finish();
    let their_after = manager.get_stats();
    assert_eq!(
        their_after.misses, their_before.misses,
        "every multi-tier-cache read must hit Redis"
    );
    println!(
        "multi_tier_cache redis_hit: {} Redis hits, {} promoted to memory (tiercache back-fills every one)",
        their_after.l2_hits - their_before.l2_hits,
        their_after.promotions - their_before.promotions
    );

    // c. Cold-key stampede.
    for o in [&tc, &tc_moka] {
        o.source.faults().set_for(Op::Get, Fault::Delay(LOAD_TIME));
    }
    mtc.source
        .faults()
        .set_for(Op::Get, Fault::Delay(LOAD_TIME));
    let coalesced_before = [tc.chain.stats().coalesced, tc_moka.chain.stats().coalesced];
    let (mut r_tc, mut r_moka, mut r_mtc) =
        (Rounds::default(), Rounds::default(), Rounds::default());
    rt.block_on(async {
        for round in 0..STAMPEDE_ROUNDS {
            let key = format!("stampede-{round:04}");
            for (o, r) in [(&tc, &mut r_tc), (&tc_moka, &mut r_moka)] {
                let (wall, loads) = our_stampede(o, &key).await;
                r.walls.push(wall);
                r.loads.push(loads);
            }
            let (wall, loads) = their_stampede(&mtc, &key).await;
            r_mtc.walls.push(wall);
            r_mtc.loads.push(loads);
        }
    });
    println!(
        "\ncold-key stampede: {STAMPEDE_TASKS} tasks, one key no tier holds, source load {LOAD_TIME:?}; \
         release -> all have the value"
    );
    r_tc.report("tiercache");
    r_moka.report("tiercache_moka");
    r_mtc.report("multi_tier_cache");
    println!(
        "requests that joined another's load: tiercache {}, tiercache_moka {} (of {})",
        tc.chain.stats().coalesced - coalesced_before[0],
        tc_moka.chain.stats().coalesced - coalesced_before[1],
        STAMPEDE_TASKS * STAMPEDE_ROUNDS
    );

    // Clean up every contender's keys.
    rt.block_on(async {
        for o in [&tc, &tc_json, &tc_moka] {
            o.redis.clear().await.unwrap();
        }
        let theirs = mtc.l2.scan_keys(&format!("{}*", mtc.prefix)).await.unwrap();
        mtc.l2.remove_bulk(&theirs).await.unwrap();
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench_peers
}
criterion_main!(benches);
