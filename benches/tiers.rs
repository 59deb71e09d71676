//! The tiers below memory, each beside the raw client doing the same work, in one run:
//!
//! * `redis_hit`: `RedisTier::get` (one GET, envelope, MessagePack decode of a `UserConfig`)
//!   against a raw redis-rs multiplexed `GET` of the same bytes, and against that GET followed
//!   by the envelope and MessagePack decoding; one task, and 32 concurrent tasks.
//! * `full_miss`: `UserConfigStorage::get_user_config` missing memory and Redis and loading from
//!   PostgreSQL (with its background back-fill; and again with each call's fill drained,
//!   untimed, before the next call) against a raw `GET` (a miss) plus a raw sqlx primary-key
//!   `SELECT` and the JSON decode, on a pool of the tier's size with sqlx's defaults and
//!   without its ping before each acquire.
//! * `get_many`: 100 keys in one batch against 100 single gets, at the Redis and at the
//!   PostgreSQL tier.
//! * `codec`: the Redis payload codec, JSON against MessagePack, for a stored `UserConfig`.
//!
//! ```text
//! cargo bench --bench tiers          # needs Redis and PostgreSQL (REDIS_URL, DATABASE_URL)
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sqlx::AssertSqlSafe;
use tiercache_core::{CacheTier, Entry, Source};
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_redis::envelope::{self, Stored};
use tiercache_testkit::{env, postgres_env, redis_env};
use userconfig::{UserConfig, UserConfigStorage};

const USERS: usize = 2_000;

fn config(user: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = "dark".into();
    c.image_generation.negative_prompt = "blurry, low quality, extra fingers".into();
    c
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `iters` calls of `op`, split over `tasks` concurrent tasks; wall time.
fn concurrently<F, Fut>(rt: &tokio::runtime::Runtime, tasks: u64, iters: u64, op: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    rt.block_on(async {
        let start = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let op = Arc::clone(&op);
            let share = iters / tasks + u64::from(t < iters % tasks);
            handles.push(tokio::spawn(async move {
                for i in 0..share {
                    op(t * 1_000_003 + i).await;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    })
}

/// A raw multiplexed `GET` of a key that must be there.
async fn raw_get(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<u8> {
    let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(con).await.unwrap();
    bytes.expect("the key is stored")
}

fn bench_tiers(c: &mut Criterion) {
    let rt = multi_thread();
    let users: Arc<Vec<String>> = Arc::new((0..USERS).map(|i| format!("user-{i:06}")).collect());
    let (redis, raw, pool, schema, postgres) = rt.block_on(async {
        let client = redis_env::redis_client().await;
        let raw = client.get_multiplexed_async_connection().await.unwrap();
        let redis = Arc::new(
            RedisTier::<String, UserConfig>::builder()
                .url(env::redis_url())
                .prefix(redis_env::unique_prefix("bench_tiers"))
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        );
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let postgres = Arc::new(
            PostgresSource::<String, UserConfig>::builder()
                .url(env::database_url())
                .schema(schema.clone())
                .build()
                .unwrap(),
        );
        for u in users.iter() {
            let value = Arc::new(config(u));
            let v = postgres
                .write(u, value.clone(), None)
                .await
                .unwrap()
                .version();
            redis.set(u, Entry::new(value, v)).await.unwrap();
        }
        (redis, raw, pool, schema, postgres)
    });

    // Redis hit: the tier against a raw GET of the same stored bytes.
    let mut group = c.benchmark_group("redis_hit");
    for tasks in [1u64, 32] {
        group.throughput(criterion::Throughput::Elements(1));
        let (tier, keys) = (redis.clone(), users.clone());
        group.bench_function(BenchmarkId::new("tiercache_redis_tier", tasks), |b| {
            b.iter_custom(|iters| {
                let (tier, keys) = (tier.clone(), keys.clone());
                concurrently(&rt, tasks, iters, move |i| {
                    let (tier, keys) = (tier.clone(), keys.clone());
                    async move {
                        let k = &keys[(i as usize) % USERS];
                        black_box(tier.get(k).await.unwrap().unwrap());
                    }
                })
            })
        });
        let redis_keys: Arc<Vec<String>> =
            Arc::new(users.iter().map(|u| redis.redis_key(u)).collect());
        let raw = raw.clone();
        group.bench_function(BenchmarkId::new("raw_redis_get", tasks), |b| {
            b.iter_custom(|iters| {
                let (raw, keys) = (raw.clone(), redis_keys.clone());
                concurrently(&rt, tasks, iters, move |i| {
                    let (mut raw, keys) = (raw.clone(), keys.clone());
                    async move {
                        black_box(raw_get(&mut raw, &keys[(i as usize) % USERS]).await);
                    }
                })
            })
        });
        // The same GET, then the decoding any reader of a `UserConfig` must do: what the
        // tier costs beyond the intrinsic work is the difference to this row.
        let (raw, keys) = (raw.clone(), redis_keys.clone());
        group.bench_function(BenchmarkId::new("raw_redis_get_and_decode", tasks), |b| {
            b.iter_custom(|iters| {
                let (raw, keys) = (raw.clone(), keys.clone());
                concurrently(&rt, tasks, iters, move |i| {
                    let (mut raw, keys) = (raw.clone(), keys.clone());
                    async move {
                        let bytes = raw_get(&mut raw, &keys[(i as usize) % USERS]).await;
                        let Ok(Stored::Value { payload, .. }) = envelope::decode(&bytes) else {
                            panic!("a stored value");
                        };
                        black_box(rmp_serde::from_slice::<UserConfig>(&payload).unwrap());
                    }
                })
            })
        });
    }
    group.finish();

    // Full miss: memory and Redis miss, PostgreSQL answers.
    let storage = rt.block_on(async {
        let short_lived = Arc::new(
            RedisTier::<String, UserConfig>::builder()
                .url(env::redis_url())
                .prefix(redis_env::unique_prefix("bench_miss"))
                // Entries expire at once: every read misses Redis (and still pays the fill).
                .ttl(Duration::from_millis(1))
                .jitter(0.0)
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        );
        UserConfigStorage::builder()
            .memory_capacity(8)
            .redis_tier(short_lived)
            .backplane(false)
            .postgres_source(postgres.clone())
            .build()
            .await
            .unwrap()
    });
    let select: String = format!(
        "SELECT value::text, version FROM {} WHERE key = $1",
        postgres.qualified_table()
    );
    let mut group = c.benchmark_group("full_miss");
    let next = Arc::new(AtomicUsize::new(0));
    {
        let (storage, keys, next) = (storage.clone(), users.clone(), next.clone());
        group.bench_function("tiercache_get_user_config", |b| {
            b.iter_custom(|iters| {
                let (storage, keys, next) = (storage.clone(), keys.clone(), next.clone());
                concurrently(&rt, 1, iters, move |_| {
                    let (storage, keys, next) = (storage.clone(), keys.clone(), next.clone());
                    async move {
                        let k = &keys[next.fetch_add(1, Ordering::Relaxed) % USERS];
                        black_box(storage.get_user_config(k).await.unwrap());
                    }
                })
            })
        });
    }
    // The caller's critical path alone: each call timed by itself, and the background Redis
    // fill it started drained (untimed) before the next one, so that it cannot queue in front
    // of the next call's GET on the shared connection.
    {
        let (storage, keys, next) = (storage.clone(), users.clone(), next.clone());
        group.bench_function("tiercache_get_user_config_fills_drained", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let redis_calls = || storage.chain().stats().tiers[1].latency.count;
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let k = &keys[next.fetch_add(1, Ordering::Relaxed) % USERS];
                        let before = redis_calls();
                        let start = Instant::now();
                        black_box(storage.get_user_config(k).await.unwrap());
                        total += start.elapsed();
                        // One GET (a miss) and one fill.
                        while redis_calls() < before + 2 {
                            tokio::task::yield_now().await;
                        }
                    }
                    total
                })
            })
        });
    }
    // The raw side on two pools of the tier's size: sqlx's defaults (which ping a connection
    // before handing it out, a round trip), and without that ping, as the tier's pool runs.
    let raw_pools = rt.block_on(async {
        let options = |ping: bool| {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(tiercache_postgres::DEFAULT_MAX_CONNECTIONS)
                .test_before_acquire(ping)
                .connect_lazy(&env::database_url())
                .unwrap()
        };
        [
            ("raw_get_then_select", options(true)),
            ("raw_get_then_select_no_ping", options(false)),
        ]
    });
    for (name, pool) in raw_pools {
        let (raw, keys, next) = (raw.clone(), users.clone(), next.clone());
        let select = Arc::new(select.clone());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (raw, pool, keys, next, select) = (
                    raw.clone(),
                    pool.clone(),
                    keys.clone(),
                    next.clone(),
                    select.clone(),
                );
                concurrently(&rt, 1, iters, move |_| {
                    let (mut raw, pool, keys, next, select) = (
                        raw.clone(),
                        pool.clone(),
                        keys.clone(),
                        next.clone(),
                        select.clone(),
                    );
                    async move {
                        let k = &keys[next.fetch_add(1, Ordering::Relaxed) % USERS];
                        let miss: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(format!("bench-miss:{k}"))
                            .query_async(&mut raw)
                            .await
                            .unwrap();
                        assert!(miss.is_none());
                        let row: (String, i64) = sqlx::query_as(AssertSqlSafe(select.as_str()))
                            .bind(k)
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                        black_box(serde_json::from_str::<UserConfig>(&row.0).unwrap());
                    }
                })
            })
        });
    }
    group.finish();

    // Batches: 100 keys in one call against 100 single calls.
    let mut group = c.benchmark_group("get_many_100");
    let hundred: Arc<Vec<String>> = Arc::new(users[..100].to_vec());
    for (name, tier) in [
        ("redis", Arc::new(Cached(redis.clone())) as Arc<dyn Lookup>),
        (
            "postgres",
            Arc::new(Sourced(postgres.clone())) as Arc<dyn Lookup>,
        ),
    ] {
        let (t, keys) = (tier.clone(), hundred.clone());
        group.bench_function(BenchmarkId::new("one_batch", name), |b| {
            b.iter_custom(|iters| {
                let (t, keys) = (t.clone(), keys.clone());
                concurrently(&rt, 1, iters, move |_| {
                    let (t, keys) = (t.clone(), keys.clone());
                    async move {
                        black_box(t.many(&keys).await);
                    }
                })
            })
        });
        let (t, keys) = (tier.clone(), hundred.clone());
        group.bench_function(BenchmarkId::new("hundred_gets", name), |b| {
            b.iter_custom(|iters| {
                let (t, keys) = (t.clone(), keys.clone());
                concurrently(&rt, 1, iters, move |_| {
                    let (t, keys) = (t.clone(), keys.clone());
                    async move {
                        for k in keys.iter() {
                            black_box(t.one(k).await);
                        }
                    }
                })
            })
        });
    }
    group.finish();

    rt.block_on(async {
        let _ = redis.clear().await;
        postgres_env::drop_schema(&pool, &schema).await;
    });
}

/// A cache tier's or a source's lookups, to bench both the same way.
#[tiercache_core::async_trait]
trait Lookup: Send + Sync {
    async fn one(&self, key: &str) -> bool;
    async fn many(&self, keys: &[String]) -> usize;
}

struct Cached(Arc<RedisTier<String, UserConfig>>);
struct Sourced(Arc<PostgresSource<String, UserConfig>>);

#[tiercache_core::async_trait]
impl Lookup for Cached {
    async fn one(&self, key: &str) -> bool {
        self.0.get(&key.to_owned()).await.unwrap().is_some()
    }
    async fn many(&self, keys: &[String]) -> usize {
        self.0.get_many(keys).await.unwrap().len()
    }
}

#[tiercache_core::async_trait]
impl Lookup for Sourced {
    async fn one(&self, key: &str) -> bool {
        self.0.get(&key.to_owned()).await.unwrap().is_some()
    }
    async fn many(&self, keys: &[String]) -> usize {
        self.0.get_many(keys).await.unwrap().len()
    }
}

fn bench_codec(c: &mut Criterion) {
    let value = config("user-000001");
    let json = serde_json::to_vec(&value).unwrap();
    let msgpack = rmp_serde::to_vec_named(&value).unwrap();
    println!(
        "codec sizes for a UserConfig: JSON {} bytes, MessagePack {} bytes",
        json.len(),
        msgpack.len()
    );
    let mut group = c.benchmark_group("codec");
    group.bench_function("json_encode", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&value)).unwrap()))
    });
    group.bench_function("msgpack_encode", |b| {
        b.iter(|| black_box(rmp_serde::to_vec_named(black_box(&value)).unwrap()))
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| black_box(serde_json::from_slice::<UserConfig>(black_box(&json)).unwrap()))
    });
    group.bench_function("msgpack_decode", |b| {
        b.iter(|| black_box(rmp_serde::from_slice::<UserConfig>(black_box(&msgpack)).unwrap()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = bench_codec, bench_tiers
}
criterion_main!(benches);
