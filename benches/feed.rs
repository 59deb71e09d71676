//! The database's change feed, measured on the real servers in one run: how long after a
//! change every one of four instances serves it, for a write through the chain and for a write
//! made with plain SQL, with the machine idle and with readers keeping both cores busy, side by
//! side with the Redis pub/sub backplane (which never learns of the SQL write); and how large
//! the log is after 100,000 writes. (What the feed costs the writers: `benches/write_cost.rs`.)
//!
//! ```text
//! cargo bench --bench feed              # 300 rounds each; DATABASE_URL and REDIS_URL or local
//! cargo bench --bench feed -- 1000      # rounds
//! cargo bench --bench feed -- --logical  # the log against the WAL stream
//! ```
//!
//! `--logical` starts a PostgreSQL of its own with `wal_level = logical` and measures, in one
//! run, the feed reading the log (`logical_decoding(false)`) and the elected follower
//! streaming the WAL, each with four instances of its own (idle, then readers busy).
//!
//! A round: every instance holds the key in memory; then, after a random pause of up to 20 ms,
//! a change; then every instance reads
//! the key (a memory hit until its copy is dropped, then a database read) until it serves the
//! new version. A round's latency is the slowest instance's, from before the change was sent
//! (for a write through the chain, the call's start: an upper bound of the time from commit;
//! for SQL, the statement's start) until the last instance serves it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{env, postgres_env, redis_env};
use userconfig::{UserConfig, UserConfigStorage};

const INSTANCES: usize = 4;
const LOG_WRITES: usize = 100_000;

fn percentiles(samples: Vec<Duration>) -> String {
    let samples = tiercache_testkit::Samples::new(samples);
    let at = |p: f64| samples.at(p);
    format!(
        "p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}  ({} rounds)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

/// Between two polls: the thread's time slice to the OS (the database server and Redis must run
/// to deliver the change), then the task's turn to tokio.
async fn yield_now() {
    std::thread::yield_now();
    tokio::task::yield_now().await;
}

#[derive(Clone, Copy, PartialEq)]
enum Writer {
    Chain,
    Sql,
}

impl Writer {
    fn name(self) -> &'static str {
        match self {
            Writer::Chain => "write through the chain",
            Writer::Sql => "write with plain SQL",
        }
    }
}

/// Each writer's latency on `setup`, with the machine idle, then with readers keeping both
/// cores busy.
async fn report(setup: &Setup, label: &str, rounds: u64) {
    for writer in [Writer::Chain, Writer::Sql] {
        println!(
            "  {label}, {}: {}",
            writer.name(),
            latency(setup, writer, rounds).await
        );
    }
    let busy = Busy::start(setup);
    for writer in [Writer::Chain, Writer::Sql] {
        println!(
            "  {label}, readers busy, {}: {}",
            writer.name(),
            latency(setup, writer, rounds).await
        );
    }
    busy.stop().await;
}

struct Setup {
    instances: Vec<UserConfigStorage>,
    pool: sqlx::PgPool,
    table: String,
}

async fn setup(schema: &str, pool: &sqlx::PgPool, redis_prefix: &str, feed: bool) -> Setup {
    setup_on(&env::database_url(), schema, pool, redis_prefix, feed, true).await
}

/// Four instances on `url`; where `logical`, the elected follower streams the WAL when the
/// server allows it.
async fn setup_on(
    url: &str,
    schema: &str,
    pool: &sqlx::PgPool,
    redis_prefix: &str,
    feed: bool,
    logical: bool,
) -> Setup {
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        let mut builder = UserConfigStorage::builder()
            .postgres_source(Arc::new(
                PostgresSource::builder()
                    .url(url)
                    .schema(schema)
                    .logical_decoding(logical)
                    .build()
                    .unwrap(),
            ))
            .follow_changes(feed)
            .backplane(!feed);
        if !feed {
            builder = builder.redis_tier(Arc::new(
                RedisTier::builder()
                    .url(redis_env::redis_url().await)
                    .prefix(redis_prefix)
                    .build()
                    .unwrap(),
            ));
        }
        instances.push(builder.build().await.unwrap());
    }
    Setup {
        instances,
        pool: pool.clone(),
        table: format!("\"{schema}\".\"tiercache_entries\""),
    }
}

/// One round: the time until the last instance serves the change, from the change's start and
/// from its return (the commit happened in between); `None` if some instance still served the
/// old version after a second.
async fn round(setup: &Setup, writer: Writer, user: &str, n: u64) -> Option<(Duration, Duration)> {
    for storage in &setup.instances {
        storage.get_user_config(user).await.unwrap();
    }
    let mut config = UserConfig::default_for(user);
    config.preferences.language = format!("l{n}");
    // At a random moment of the elected follower's read cycle, not right after the last one
    // (which is when the previous round ended).
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..20_000))).await;
    let started = Instant::now();
    let version = match writer {
        Writer::Chain => setup.instances[0]
            .update_user_config(user, &config)
            .await
            .unwrap(),
        Writer::Sql => {
            let json = serde_json::to_string(&config).unwrap();
            let v: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "UPDATE {} SET value = $2::jsonb WHERE key = $1 RETURNING version",
                setup.table
            )))
            .bind(user)
            .bind(json)
            .fetch_one(&setup.pool)
            .await
            .unwrap();
            v as u64
        }
    };
    let returned = Instant::now();
    let mut pending: Vec<usize> = (0..INSTANCES).collect();
    while !pending.is_empty() {
        if started.elapsed() > Duration::from_secs(1) {
            return None;
        }
        let mut still = Vec::new();
        for i in pending {
            let got = setup.instances[i].fetch_user_config(user).await.unwrap();
            if got.version < version {
                still.push(i);
            }
        }
        pending = still;
        if !pending.is_empty() {
            yield_now().await;
        }
    }
    Some((started.elapsed(), returned.elapsed()))
}

async fn latency(setup: &Setup, writer: Writer, rounds: u64) -> String {
    let users: Vec<String> = (0..8).map(|i| format!("bench-{i}")).collect();
    for user in &users {
        setup.instances[0]
            .update_user_config(user, &UserConfig::default_for(user))
            .await
            .unwrap();
    }
    let (mut from_start, mut from_return) = (Vec::new(), Vec::new());
    let mut missed = 0;
    for n in 0..rounds {
        match round(setup, writer, &users[n as usize % users.len()], n).await {
            Some((start, ret)) => {
                from_start.push(start);
                from_return.push(ret);
            }
            None => missed += 1,
        }
    }
    if from_start.is_empty() {
        return format!(
            "never within 1 s in all {missed} rounds (only a TTL would end the old copies)"
        );
    }
    let missed = if missed > 0 {
        format!("; {missed} rounds never converged within 1 s")
    } else {
        String::new()
    };
    format!(
        "from its start  {}\n{:>39}from its return {}{missed}",
        percentiles(from_start),
        "",
        percentiles(from_return)
    )
}

/// Readers that keep both cores busy until dropped: each loops over the instances and the
/// bench's users.
struct Busy {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Busy {
    fn start(setup: &Setup) -> Busy {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..8)
            .map(|t| {
                let instances = setup.instances.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut n = t;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let storage = &instances[n % instances.len()];
                        let _ = storage.get_user_config(&format!("bench-{}", n % 8)).await;
                        n += 1;
                        if n % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        Busy { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Whether `schema`'s writers emit logical messages (its follower streams the WAL).
async fn writers_emit(pool: &sqlx::PgPool, schema: &str) -> bool {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT last_value = 1 FROM \"{schema}\".tiercache_entries_emit"
    )))
    .fetch_one(pool)
    .await
    .unwrap_or(false) // migrated on first use
}

/// The `--logical` run: the feed reading the log against the WAL stream, on a server of its
/// own.
async fn logical(rounds: u64) {
    let Some(server) = postgres_env::LocalPostgres::start(&[("wal_level", "logical")]).await else {
        return;
    };
    let url = server.url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    for (schema, streams) in [("stock", false), ("streaming", true)] {
        let side = setup_on(&url, schema, &pool, "", true, streams).await;
        side.instances[0].get_user_config("warm-up").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while streams && !writers_emit(&pool, schema).await {
            assert!(
                Instant::now() < deadline,
                "the follower never streamed the WAL"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let label = if streams {
            "feed streams the WAL"
        } else {
            "feed reads the log"
        };
        report(&side, label, rounds).await;
    }
}

fn main() {
    let logical_run = std::env::args().any(|a| a == "--logical");
    let rounds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if logical_run {
        println!("every one of {INSTANCES} instances serves a change, from the change's start:");
        rt.block_on(logical(rounds));
        return;
    }
    rt.block_on(async {
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let prefix = redis_env::unique_prefix("bench_feed");

        let feed = setup(&schema, &pool, &prefix, true).await;
        println!("every one of {INSTANCES} instances serves a change, from the change's start:");
        report(&feed, "feed", rounds).await;
        drop(feed);
        let backplane = setup(&schema, &pool, &prefix, false).await;
        println!(
            "  backplane, write through the chain: {}",
            latency(&backplane, Writer::Chain, rounds).await
        );
        println!(
            "  backplane, write with plain SQL:    {}",
            latency(&backplane, Writer::Sql, rounds.min(20)).await
        );
        if let Some(redis) = backplane.instances[0].redis() {
            use tiercache_core::CacheTier;
            let _ = redis.clear().await;
        }
        drop(backplane);

        // 100,000 writes through the tier (8 at a time), then the log's size.
        let tier = Arc::new(
            PostgresSource::<String, UserConfig>::builder()
                .url(env::database_url())
                .schema(&schema)
                .build()
                .unwrap(),
        );
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let tier = Arc::clone(&tier);
            tasks.push(tokio::spawn(async move {
                use tiercache_core::Source;
                for i in (t..LOG_WRITES).step_by(8) {
                    let user = format!("log-{}", i % 1000);
                    let mut config = UserConfig::default_for(&user);
                    config.preferences.language = format!("l{i}");
                    let _ = tier.write(&user, Arc::new(config), None).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let took = started.elapsed();
        let (rows, bytes): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), pg_total_relation_size('{}') FROM {}",
            tier.changes_table().replace('\'', "''"),
            tier.changes_table()
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        println!(
            "{LOG_WRITES} writes in {took:.1?}; the change log then holds {rows} entries, \
             {:.1} MiB with its index (default retention {:?}; pruned once a minute)",
            bytes as f64 / (1024.0 * 1024.0),
            tiercache_postgres::DEFAULT_CHANGE_RETENTION
        );
        postgres_env::drop_schema(&pool, &schema).await;
    });
}
