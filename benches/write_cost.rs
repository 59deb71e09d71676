//! What the change feed costs the database's writers, measured on the real server in one run:
//! concurrent writers through the crate's write function (the version trigger and the change
//! log, with four chains following the feed), against a plain upsert on a table with no trigger,
//! alternately, at 1, 16 and 64 clients; and writers of another database of the same instance
//! that use `NOTIFY` themselves (another application), while ours or plain upserts run; and
//! ours again with no follower running (what the feed's own reads and messages cost).
//!
//! ```text
//! cargo bench --bench write_cost            # 4 s per run, 3 rounds; DATABASE_URL or local
//! cargo bench --bench write_cost -- 6 5     # seconds per run, rounds
//! cargo bench --bench write_cost -- --logical 4 3
//! ```
//!
//! `--logical` starts a PostgreSQL of its own with `wal_level = logical` (and `fsync = on`)
//! and compares, in one run, the plain upsert, the crate's writes with the feed reading the
//! log (`logical_decoding(false)`) and with the elected follower streaming the WAL (writers
//! emit a logical message instead of a log entry), four chains following each.
//!
//! Each client has a connection of its own and writes a random key among 10,000 (a user's
//! 2.3 KiB configuration, one field changed each time) as fast as the server commits it
//! (`synchronous_commit` as the server has it). Runs of the two sides alternate, so that the
//! machine's noise falls on both; the figures are medians.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};
use tiercache_core::TieredCache;
use tiercache_memory::MemoryTier;
use tiercache_postgres::PostgresSource;
use tiercache_testkit::{env, postgres_env};
use userconfig::UserConfig;

const KEYS: u64 = 10_000;
const OTHER_DATABASE: &str = "tiercache_bench_other";

/// A statement each client runs, `$1` the key and `$2` the value (JSON).
struct Side {
    name: &'static str,
    sql: String,
}

/// Statements per second of `clients` connections running `sql` for `secs` (counted from when
/// every client is connected).
async fn throughput(options: &PgConnectOptions, sql: &str, clients: u64, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(tokio::sync::Barrier::new(clients as usize + 1));
    let mut tasks = Vec::new();
    let value = serde_json::to_string(&UserConfig::default_for("bench")).unwrap();
    for c in 0..clients {
        let (options, sql, done, value, ready) = (
            options.clone(),
            sql.to_owned(),
            Arc::clone(&done),
            value.clone(),
            Arc::clone(&ready),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = options.connect().await.unwrap();
            ready.wait().await;
            let stop = Instant::now() + Duration::from_secs_f64(secs);
            let mut rng = fastrand::Rng::with_seed(c);
            // A different value each time, so that no write is skipped as unchanged.
            let mut n = 0u64;
            while Instant::now() < stop {
                n += 1;
                let key = format!("user-{}", rng.u64(0..KEYS));
                let value = value.replacen("\"theme\":\"", &format!("\"theme\":\"{c}-{n}-"), 1);
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(key)
                    .bind(value)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
            let _ = conn.close().await;
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Alternating runs of each side at `clients`; the medians, in the sides' order.
async fn compare(
    options: &PgConnectOptions,
    sides: &[&Side],
    clients: u64,
    secs: f64,
    rounds: usize,
) -> Vec<f64> {
    let mut runs = vec![Vec::new(); sides.len()];
    for _ in 0..rounds {
        for (i, side) in sides.iter().enumerate() {
            runs[i].push(throughput(options, &side.sql, clients, secs).await);
        }
    }
    runs.into_iter().map(median).collect()
}

/// Another application's writers in another database: a plain table whose trigger NOTIFYs.
async fn other_database(admin: &sqlx::PgPool, options: &PgConnectOptions) -> Option<Side> {
    let _ = sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {OTHER_DATABASE}"
    )))
    .execute(admin)
    .await;
    if let Err(error) = sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {OTHER_DATABASE}")))
        .execute(admin)
        .await
    {
        println!("(no other database: {error}; that part is skipped)");
        return None;
    }
    let mut conn = options
        .clone()
        .database(OTHER_DATABASE)
        .connect()
        .await
        .unwrap();
    for statement in [
        "CREATE TABLE app (key text PRIMARY KEY, value jsonb NOT NULL)",
        "CREATE FUNCTION app_notify() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_notify('app', NEW.key); RETURN NULL; END $$",
        "CREATE TRIGGER app_notify AFTER INSERT OR UPDATE ON app \
         FOR EACH ROW EXECUTE FUNCTION app_notify()",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    let _ = conn.close().await;
    Some(Side {
        name: "another database's notifying upsert",
        sql: "INSERT INTO app (key, value) VALUES ($1, $2::jsonb) \
              ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            .into(),
    })
}

/// Four chains following `schema`'s feed on `url`, streaming the WAL where `logical`.
async fn followers(url: &str, schema: &str, logical: bool) -> Vec<TieredCache<String, UserConfig>> {
    let mut chains = Vec::new();
    for _ in 0..4 {
        let source = PostgresSource::<String, UserConfig>::builder()
            .url(url)
            .schema(schema)
            .logical_decoding(logical)
            .build()
            .unwrap();
        source.migrate().await.unwrap();
        chains.push(
            TieredCache::builder()
                .tier(MemoryTier::new())
                .source(source)
                .build()
                .unwrap(),
        );
    }
    chains
}

fn write_function(schema: &str) -> String {
    format!(
        "SELECT outcome, version FROM \"{schema}\".\"tiercache_entries_write\"($1, $2::jsonb, NULL)"
    )
}

/// The `--logical` run: the log against the WAL stream, on a server of its own.
async fn logical(secs: f64, rounds: usize) {
    let Some(server) =
        postgres_env::LocalPostgres::start(&[("wal_level", "logical"), ("fsync", "on")]).await
    else {
        return;
    };
    let url = server.url();
    let options: PgConnectOptions = url.parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let _log = followers(&url, "stock", false).await;
    let _stream = followers(&url, "streaming", true).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on: bool =
            sqlx::query_scalar("SELECT last_value = 1 FROM streaming.tiercache_entries_emit")
                .fetch_one(&pool)
                .await
                .unwrap();
        if on {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never streamed the WAL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(
        "CREATE TABLE public.plain (key text PRIMARY KEY, value jsonb NOT NULL, \
         version bigint NOT NULL DEFAULT 1, updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let plain = Side {
        name: "plain upsert",
        sql: "INSERT INTO public.plain (key, value) VALUES ($1, $2::jsonb) \
              ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            .into(),
    };
    let log = Side {
        name: "ours, feed reads the log",
        sql: write_function("stock"),
    };
    let stream = Side {
        name: "ours, feed streams the WAL",
        sql: write_function("streaming"),
    };
    println!(
        "{secs} s per run, {rounds} rounds, medians; wal_level = logical, fsync = on; \
         4 chains follow each schema"
    );
    for clients in [1, 16, 64] {
        let m = compare(&options, &[&plain, &log, &stream], clients, secs, rounds).await;
        println!(
            "{clients:>3} clients: {} {:>6.0} tps | {} {:>6.0} tps ({:.2}x) | {} {:>6.0} tps \
             ({:.2}x)",
            plain.name,
            m[0],
            log.name,
            m[1],
            m[1] / m[0],
            stream.name,
            m[2],
            m[2] / m[0]
        );
    }
    let wal: String = sqlx::query_scalar(
        "SELECT coalesce(pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), \
         confirmed_flush_lsn)), 'no slot') FROM pg_replication_slots LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|_| "no slot".into());
    println!("WAL the slot still holds at the end: {wal}");
}

fn main() {
    let logical_run = std::env::args().any(|a| a == "--logical");
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<f64>().ok());
    let secs = args.next().unwrap_or(4.0);
    let rounds = args.next().map_or(3, |r| r as usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if logical_run {
        rt.block_on(logical(secs, rounds));
        return;
    }
    rt.block_on(async {
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let options: PgConnectOptions = env::database_url().parse().unwrap();
        // Four chains follow the feed: one of them is elected and reads the log every 10 ms
        // (this server's wal_level is its own: where it is logical, the WAL is streamed).
        let chains = followers(&env::database_url(), &schema, true).await;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE \"{schema}\".plain (key text PRIMARY KEY, value jsonb NOT NULL, \
             version bigint NOT NULL DEFAULT 1, updated_at timestamptz NOT NULL DEFAULT now())"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let plain = Side {
            name: "plain upsert, no trigger",
            sql: format!(
                "INSERT INTO \"{schema}\".plain (key, value) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            ),
        };
        let ours = Side {
            name: "the crate's write function",
            sql: write_function(&schema),
        };
        println!("{secs} s per run, {rounds} rounds, medians; feed on (4 chains following)");
        let mut ours_at = Vec::new();
        for clients in [1, 16, 64] {
            let m = compare(&options, &[&plain, &ours], clients, secs, rounds).await;
            println!(
                "{clients:>3} clients: {:<28} {:>7.0} tps | {:<28} {:>7.0} tps | {:.2}x",
                plain.name,
                m[0],
                ours.name,
                m[1],
                m[1] / m[0]
            );
            ours_at.push(m[1]);
        }
        println!(
            "the crate's writes: 16 clients {:.2}x as fast as 1, 64 clients {:.2}x",
            ours_at[1] / ours_at[0],
            ours_at[2] / ours_at[0]
        );

        if let Some(other) = other_database(&pool, &options).await {
            let other_options = options.clone().database(OTHER_DATABASE);
            // The other database's writers alone, then while 16 of ours (or 16 plain
            // upserts) write in this one.
            let alone = compare(&other_options, &[&other], 16, secs, rounds).await[0];
            let mut beside = Vec::new();
            for side in [&plain, &ours] {
                let mut runs = Vec::new();
                for _ in 0..rounds {
                    let (o, s) = (other_options.clone(), other.sql.clone());
                    let background = {
                        let (options, sql) = (options.clone(), side.sql.clone());
                        tokio::spawn(async move { throughput(&options, &sql, 16, secs).await })
                    };
                    runs.push(throughput(&o, &s, 16, secs).await);
                    background.await.unwrap();
                }
                beside.push(median(runs));
            }
            println!(
                "16 clients of {}: alone {:.0} tps; beside 16 plain upserts here {:.0} tps; \
                 beside 16 of the crate's writes here {:.0} tps ({:.2}x of beside plain)",
                other.name,
                alone,
                beside[0],
                beside[1],
                beside[1] / beside[0]
            );
            let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE {OTHER_DATABASE}")))
                .execute(&pool)
                .await;
        }
        // What the feed's followers themselves cost (reading the log, telling each other,
        // applying it; on this machine, in this process): the same writes with none running.
        drop(chains);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m = compare(&options, &[&plain, &ours], 16, secs, rounds).await;
        println!(
            " 16 clients, no follower running: {:.0} tps against {:.0} tps plain ({:.2}x)",
            m[1],
            m[0],
            m[1] / m[0]
        );
        postgres_env::drop_schema(&pool, &schema).await;
    });
}
