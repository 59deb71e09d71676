//! A memory hit through `TieredCache::get` and through `UserConfigStorage::get_user_config`,
//! side by side with the raw caches they compete with,
//! in one run: `quick_cache::sync::Cache::get`, `moka::future::Cache::get`, and an
//! `lru::LruCache` behind a `Mutex`. 500 and 100,000 keys, every lookup a hit, on one thread
//! and on two.
//!
//! ```text
//! cargo bench --bench memory_hit
//! ```
//!
//! On two threads the reported time is wall time per lookup across both threads (the inverse
//! of throughput), so a contender that scales shows half its one-thread time.
//!
//! `tiercache_chain_no_peek` is the same chain with the memory tier's synchronous `peek` path
//! hidden, so that each hit goes through `CacheTier::get`'s boxed future: what `peek` saves.
//!
//! `tiercache_chain_floor_alive` is the chain while a version floor is alive (an update could
//! not reach a tier: every hit checks the floors under a lock), and
//! `tiercache_chain_floor_expired` the same chain once that floor has died: back to one load.

use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tiercache_core::async_trait;
use tiercache_core::{CacheTier, Entry, Result, TierStats, TieredCache, Version};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier};

type Val = Arc<String>;

/// The memory tier without its synchronous path, to show what `peek` saves: every hit goes
/// through the boxed future of the `async_trait` method `get`.
struct AsyncOnly<T>(T);

#[async_trait]
impl<T: CacheTier<String, String>> CacheTier<String, String> for AsyncOnly<T> {
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn get(&self, key: &String) -> Result<Option<Entry<String>>> {
        self.0.get(key).await
    }
    async fn set(&self, key: &String, entry: Entry<String>) -> Result<bool> {
        self.0.set(key, entry).await
    }
    async fn invalidate(&self, key: &String, version: Option<Version>) -> Result<()> {
        self.0.invalidate(key, version).await
    }
    async fn clear(&self) -> Result<()> {
        self.0.clear().await
    }
    fn stats(&self) -> TierStats {
        self.0.stats()
    }
}

fn keys(n: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..n).map(|i| format!("user-{i:08}")).collect();
    // Visit in a fixed random order, so the hardware prefetcher cannot walk the table.
    fastrand::Rng::with_seed(7).shuffle(&mut keys);
    keys
}

fn value() -> Val {
    Arc::new("{\"theme\":\"dark\",\"font_size\":14}".to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `lookups` on `threads` threads, each with its own current-thread runtime, splitting
/// `iters` lookups between them; returns the wall time from the common start to the last
/// finish.
fn run_threads<F, Fut>(threads: usize, iters: u64, lookups: F) -> Duration
where
    F: Fn(u64, u64) -> Fut + Sync,
    Fut: std::future::Future<Output = ()>,
{
    let barrier = Barrier::new(threads + 1);
    let per_thread = iters / threads as u64;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, lookups) = (&barrier, &lookups);
                s.spawn(move || {
                    let rt = runtime();
                    barrier.wait();
                    rt.block_on(lookups(t as u64 * 7_919, per_thread));
                    Instant::now()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let end = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap();
        end - start
    })
}

fn bench_memory_hit(c: &mut Criterion) {
    let rt = runtime();
    for n in [500usize, 100_000] {
        let keys = keys(n);
        let mask = keys.len();

        // The chain: memory over an in-process source, filled by reading every key once.
        let source = FakeSource::<String, String>::new("db");
        for k in &keys {
            source.put(
                k.clone(),
                "{\"theme\":\"dark\",\"font_size\":14}".to_string(),
            );
        }
        // Every contender gets room for twice the keys: sharded and admission-controlled caches
        // (ours, quick_cache, moka) may turn a key away before they are full, and this bench
        // measures hits only.
        let room = 2 * n;
        let memory = MemoryTier::<String, String>::builder()
            .capacity(room)
            .build()
            .unwrap();
        let chain = TieredCache::builder()
            .tier(memory)
            .source(source.clone())
            .build()
            .unwrap();
        let async_memory = MemoryTier::<String, String>::builder()
            .capacity(room)
            .build()
            .unwrap();
        let async_chain = TieredCache::builder()
            .tier(AsyncOnly(async_memory))
            .source(source)
            .build()
            .unwrap();
        rt.block_on(async {
            for k in &keys {
                chain.get(k).await.unwrap().unwrap();
                async_chain.get(k).await.unwrap().unwrap();
            }
        });

        // The userconfig facade over the same shape: memory over an in-process source.
        let configs = configs_for(&keys);
        let storage = rt
            .block_on(
                userconfig::UserConfigStorage::builder()
                    .memory_capacity(room)
                    .source(Arc::new(configs))
                    .build(),
            )
            .unwrap();
        // The same without the consistency verifier (on by default: 1 hit in 1,000 sampled),
        // for its cost on a hit.
        let unverified = rt
            .block_on(
                userconfig::UserConfigStorage::builder()
                    .memory_capacity(room)
                    .source(Arc::new(configs_for(&keys)))
                    .consistency_checks(0, std::time::Duration::from_secs(1), 1)
                    .build(),
            )
            .unwrap();
        rt.block_on(async {
            for k in &keys {
                storage.get_user_config(k).await.unwrap();
                unverified.get_user_config(k).await.unwrap();
            }
        });
        assert_eq!(storage.get_cache_stats().memory_cache.evictions, 0);

        let quick: quick_cache::sync::Cache<String, Val> = quick_cache::sync::Cache::new(room);
        let moka: moka::future::Cache<String, Val> = moka::future::Cache::new(room as u64);
        let lru = Mutex::new(lru::LruCache::<String, Val>::new(
            std::num::NonZeroUsize::new(room).unwrap(),
        ));
        rt.block_on(async {
            for k in &keys {
                quick.insert(k.clone(), value());
                moka.insert(k.clone(), value()).await;
                lru.lock().unwrap().put(k.clone(), value());
            }
        });
        rt.block_on(async {
            for k in &keys {
                assert!(quick.get(k).is_some(), "quick_cache must hold every key");
                assert!(moka.get(k).await.is_some(), "moka must hold every key");
                assert!(lru.lock().unwrap().get(k).is_some());
            }
        });
        let stats = chain.stats();
        assert_eq!(
            stats.tiers[0].tier.evictions, 0,
            "memory must hold every key"
        );
        let floored = |expire: bool| floored_chain(&rt, &keys, room, expire);
        let (floor_alive, floor_expired) = (floored(false), floored(true));

        for threads in [1usize, 2] {
            let mut group = c.benchmark_group(format!("memory_hit/{n}_keys/{threads}_thread"));
            group.throughput(criterion::Throughput::Elements(1));

            group.bench_function(BenchmarkId::from_parameter("tiercache_chain"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |offset, count| {
                        let (chain, keys) = (&chain, &keys);
                        async move {
                            for i in 0..count {
                                let k = &keys[((offset + i) as usize) % mask];
                                black_box(chain.get(k).await.unwrap());
                            }
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::from_parameter("userconfig_get"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |offset, count| {
                        let (storage, keys) = (&storage, &keys);
                        async move {
                            for i in 0..count {
                                let k = &keys[((offset + i) as usize) % mask];
                                black_box(storage.get_user_config(k).await.unwrap());
                            }
                        }
                    })
                })
            });
            group.bench_function(
                BenchmarkId::from_parameter("userconfig_get_unverified"),
                |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, |offset, count| {
                            let (storage, keys) = (&unverified, &keys);
                            async move {
                                for i in 0..count {
                                    let k = &keys[((offset + i) as usize) % mask];
                                    black_box(storage.get_user_config(k).await.unwrap());
                                }
                            }
                        })
                    })
                },
            );
            group.bench_function(
                BenchmarkId::from_parameter("tiercache_chain_no_peek"),
                |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, |offset, count| {
                            let (chain, keys) = (&async_chain, &keys);
                            async move {
                                for i in 0..count {
                                    let k = &keys[((offset + i) as usize) % mask];
                                    black_box(chain.get(k).await.unwrap());
                                }
                            }
                        })
                    })
                },
            );
            for (name, chain) in [
                ("tiercache_chain_floor_alive", &floor_alive),
                ("tiercache_chain_floor_expired", &floor_expired),
            ] {
                group.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter_custom(|iters| {
                        run_threads(threads, iters, |offset, count| {
                            let keys = &keys;
                            async move {
                                for i in 0..count {
                                    let k = &keys[((offset + i) as usize) % mask];
                                    black_box(chain.get(k).await.unwrap());
                                }
                            }
                        })
                    })
                });
            }
            group.bench_function(BenchmarkId::from_parameter("quick_cache"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |offset, count| {
                        let (quick, keys) = (&quick, &keys);
                        async move {
                            for i in 0..count {
                                let k = &keys[((offset + i) as usize) % mask];
                                black_box(quick.get(k));
                            }
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::from_parameter("moka_future"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |offset, count| {
                        let (moka, keys) = (&moka, &keys);
                        async move {
                            for i in 0..count {
                                let k = &keys[((offset + i) as usize) % mask];
                                black_box(moka.get(k).await);
                            }
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::from_parameter("lru_mutex"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |offset, count| {
                        let (lru, keys) = (&lru, &keys);
                        async move {
                            for i in 0..count {
                                let k = &keys[((offset + i) as usize) % mask];
                                black_box(lru.lock().unwrap().get(k).cloned());
                            }
                        }
                    })
                })
            });
            group.finish();
        }
    }
}

/// The chain over a second tier that missed one update, so that a version floor was raised;
/// with `expire`, the floor has died since (on the chain's manual clock) and one read has
/// dropped it. Every key is in memory.
fn floored_chain(
    rt: &tokio::runtime::Runtime,
    keys: &[String],
    room: usize,
    expire: bool,
) -> TieredCache<String, String> {
    use tiercache_testkit::{Fault, ManualClock};
    let manual = ManualClock::new();
    let memory = MemoryTier::<String, String>::builder()
        .capacity(room)
        .ttl(Duration::from_secs(3600))
        .clock(manual.clock())
        .build()
        .unwrap();
    let redis = FakeTier::<String, String>::cache("redis").with_clock(manual.clock());
    let source = FakeSource::<String, String>::new("db");
    for k in keys {
        source.put(k.clone(), "{\"theme\":\"dark\"}".to_string());
    }
    let chain = TieredCache::builder()
        .tier(memory)
        .tier(redis.clone())
        .source(source)
        .clock(manual.clock())
        .max_stale(None)
        .floor_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    rt.block_on(async {
        redis.faults().set(Fault::Error);
        chain
            .update(&"floored".to_string(), Arc::new("v".to_string()))
            .await
            .unwrap();
        redis.faults().clear();
        assert_eq!(chain.stats().floors, 1);
        if expire {
            manual.advance(Duration::from_secs(61));
        }
        for _ in 0..2 {
            // (The second round hits memory: a hit checks the floors and drops dead ones.)
            for k in keys {
                chain.get(k).await.unwrap().unwrap();
            }
        }
        assert_eq!(chain.stats().floors, u64::from(!expire));
    });
    chain
}

/// A source holding the defaults of every key.
fn configs_for(keys: &[String]) -> FakeSource<String, userconfig::UserConfig> {
    let configs = FakeSource::<String, userconfig::UserConfig>::new("db");
    for k in keys {
        configs.put(k.clone(), userconfig::UserConfig::default_for(k.as_str()));
    }
    configs
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench_memory_hit
}
criterion_main!(benches);
