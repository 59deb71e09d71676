//! Faults between a service instance and its servers, through fault-injecting TCP proxies:
//! for each fault, × {memory hit, Redis hit, full miss} × {get, update}, the outcome the
//! design promises; then recovery, and no instance serving what was invalidated meanwhile.

use sqlx::AssertSqlSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_core::{CacheTier, DEFAULT_BREAKER_COOLDOWN};
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{FaultProxy, ProxyMode, env, postgres_env, redis_env};
use userconfig::{Answer, UserConfig, UserConfigStorage};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Redis refuses and resets connections (killed).
    RedisDown,
    /// Redis accepts and never answers (partitioned).
    RedisBlackhole,
    /// PostgreSQL refuses and resets connections.
    PostgresDown,
    /// PostgreSQL accepts and never answers.
    PostgresBlackhole,
}

impl Fault {
    fn is_redis(self) -> bool {
        matches!(self, Fault::RedisDown | Fault::RedisBlackhole)
    }

    fn mode(self) -> ProxyMode {
        match self {
            Fault::RedisDown | Fault::PostgresDown => ProxyMode::Reset,
            Fault::RedisBlackhole | Fault::PostgresBlackhole => ProxyMode::Blackhole,
        }
    }
}

const SCENARIOS: [&str; 3] = ["memory_hit", "redis_hit", "full_miss"];

struct Rig {
    /// The instance under test: Redis and PostgreSQL through proxies.
    faulty: UserConfigStorage,
    /// Another instance, straight to the servers.
    healthy: UserConfigStorage,
    redis_proxy: FaultProxy,
    pg_proxy: FaultProxy,
    pool: sqlx::PgPool,
    schema: String,
}

fn host_port(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap()
        .rsplit('@')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

async fn rig(tag: &str) -> Rig {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let redis_url = redis_env::redis_url().await;
    let prefix = redis_env::unique_prefix(tag);
    let redis_proxy = FaultProxy::start(&host_port(&redis_url)).await;
    let pg_proxy = FaultProxy::start(&host_port(&env::database_url())).await;
    let pg_url = env::database_url().replace(
        &host_port(&env::database_url()),
        &pg_proxy.addr().to_string(),
    );

    let postgres = |url: String| {
        Arc::new(
            PostgresSource::builder()
                .url(url)
                .schema(schema.clone())
                .build()
                .unwrap(),
        )
    };
    let redis = |url: String| {
        Arc::new(
            RedisTier::builder()
                .url(url)
                .prefix(prefix.clone())
                .build()
                .unwrap(),
        )
    };
    let faulty = UserConfigStorage::builder()
        .redis_tier(redis(format!("redis://{}/", redis_proxy.addr())))
        .postgres_source(postgres(pg_url))
        .build()
        .await
        .unwrap();
    let healthy = UserConfigStorage::builder()
        .redis_tier(redis(redis_url))
        .postgres_source(postgres(env::database_url()))
        .build()
        .await
        .unwrap();
    Rig {
        faulty,
        healthy,
        redis_proxy,
        pg_proxy,
        pool,
        schema,
    }
}

fn themed(user: &str, theme: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = theme.into();
    c
}

async fn wait_until<F, Fut>(what: &str, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if done().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn run(fault: Fault) {
    let r = rig(&format!("{fault:?}")).await;
    let user = |scenario: &str, op: &str| format!("{scenario}-{op}");
    // Every user stored at a first version through the faulty instance (memory, Redis,
    // database).
    let mut first = std::collections::HashMap::new();
    for scenario in SCENARIOS {
        for op in ["get", "update"] {
            let u = user(scenario, op);
            let v1 = r
                .faulty
                .update_user_config(&u, &themed(&u, "v1"))
                .await
                .unwrap();
            first.insert(u, v1);
        }
    }
    // Arrange where each user is found: memory hits in this instance's memory, Redis hits in
    // Redis only, full misses in the database only.
    r.faulty.clear_memory_cache().await;
    let redis = r.faulty.redis().unwrap();
    for op in ["get", "update"] {
        redis
            .invalidate(&user("full_miss", op), None)
            .await
            .unwrap();
        let hit = r
            .faulty
            .fetch_user_config(&user("memory_hit", op))
            .await
            .unwrap();
        assert_eq!(hit.answered_by, Answer::Redis);
    }

    let proxy = if fault.is_redis() {
        &r.redis_proxy
    } else {
        &r.pg_proxy
    };
    proxy.set_mode(fault.mode());
    proxy.kill_connections();

    for scenario in SCENARIOS {
        // get
        let u = user(scenario, "get");
        let got = r.faulty.fetch_user_config(&u).await;
        match (fault.is_redis(), scenario) {
            (_, "memory_hit") => {
                assert_eq!(
                    got.unwrap().answered_by,
                    Answer::Memory,
                    "{fault:?} {scenario}"
                )
            }
            (true, _) => assert_eq!(
                got.unwrap().answered_by,
                Answer::Database,
                "{fault:?} {scenario}: Redis skipped, the database answers"
            ),
            (false, "redis_hit") => {
                assert_eq!(
                    got.unwrap().answered_by,
                    Answer::Redis,
                    "{fault:?} {scenario}"
                )
            }
            (false, _) => {
                let err = got.unwrap_err();
                assert!(err.is_transient(), "{fault:?} {scenario}: {err:?}");
            }
        }

        // update
        let u = user(scenario, "update");
        let result = r.faulty.update_user_config(&u, &themed(&u, "v2")).await;
        if fault.is_redis() {
            let v2 = result.unwrap();
            assert!(v2 > first[&u], "{fault:?} {scenario}: the database took it");
            assert_eq!(
                r.faulty.fetch_user_config(&u).await.unwrap().version,
                v2,
                "{fault:?} {scenario}: this instance sees its update"
            );
        } else {
            let err = result.unwrap_err();
            assert!(err.is_transient(), "{fault:?} {scenario}: {err:?}");
            // A write the database refused touched nothing: memory hits still answer v1 from
            // memory. (One whose outcome is unknown, a blackholed database's timeout, is
            // invalidated everywhere instead, in a task of its own: no promise to check here.)
            if scenario == "memory_hit" && !err.outcome_unknown() {
                let got = r.faulty.fetch_user_config(&u).await.unwrap();
                assert_eq!((got.version, got.answered_by), (first[&u], Answer::Memory));
            }
        }
    }
    let stats = r.faulty.get_cache_stats();
    if fault.is_redis() {
        assert_eq!(stats.chain.failed, 0, "no read failed: {stats:?}");
        // The breaker stopped paying Redis's time limit on every call: after it opened, only
        // one probe per cool-down reached Redis, the rest were skipped.
        let redis = &stats.chain.tiers[1];
        assert!(redis.breaker_opened >= 1, "{redis:?}");
        assert!(redis.skipped > redis.errors, "{redis:?}");
    } else {
        assert!(stats.chain.source.breaker_opened >= 1, "{stats:?}");
    }

    // Back to normal.
    proxy.set_mode(ProxyMode::Pass);
    let took = wait_until(
        "the faulty instance answers from every tier again",
        || async {
            r.faulty.clear_memory_cache().await;
            matches!(
                r.faulty.fetch_user_config(&user("redis_hit", "get")).await,
                Ok(f) if f.answered_by == Answer::Redis
            ) && r
                .faulty
                .fetch_user_config(&user("full_miss", "get"))
                .await
                .is_ok()
        },
    )
    .await;
    eprintln!("{fault:?}: recovered {took:?} after the fault cleared");

    // Once the writer has replayed what Redis missed (it does by itself; flush waits for
    // it), no instance serves a version that was replaced while the fault lasted: not on the
    // first read, with no retry.
    r.faulty
        .flush(Duration::from_secs(5))
        .await
        .expect("the writer replayed what Redis missed");
    for scenario in SCENARIOS {
        let u = user(scenario, "update");
        // What the database holds: the update with Redis faulty, the first version with the
        // database faulty (its update never reached it).
        let expected: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM \"{}\".tiercache_entries WHERE key = $1",
            r.schema
        )))
        .bind(&u)
        .fetch_one(&r.pool)
        .await
        .unwrap();
        let expected = expected as u64;
        assert_eq!(expected > first[&u], fault.is_redis(), "{scenario}");
        r.healthy.clear_memory_cache().await;
        assert_eq!(
            r.healthy.fetch_user_config(&u).await.unwrap().version,
            expected,
            "{scenario}: the other instance read a replaced version"
        );
        assert_eq!(
            r.faulty.fetch_user_config(&u).await.unwrap().version,
            expected
        );
    }
    let _ = r.faulty.redis().unwrap().clear().await;
    postgres_env::drop_schema(&r.pool, &r.schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down() {
    run(Fault::RedisDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed() {
    run(Fault::RedisBlackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down() {
    run(Fault::PostgresDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blackholed() {
    run(Fault::PostgresBlackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_starts_while_redis_and_postgres_are_down() {
    let started = UserConfigStorage::builder()
        .redis_url("redis://127.0.0.1:1/")
        .database_url("postgres://postgres@127.0.0.1:1/test")
        .build()
        .await
        .expect("builds without reaching either server");
    let err = started.get_user_config("anyone").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started
            .get_user_config("")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
}

/// A server that is down is asked at most once per breaker cool-down, whatever asks: reads
/// through the chain and the database calls the chain does not make itself (history). The
/// chain's breaker is what holds this (three failures, then one probe per 250 ms); the tiers
/// used to keep fail-fast windows of their own as well, which this test showed to add nothing
/// once every database call goes through the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_server_is_asked_at_most_once_per_cool_down() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let redis_url = redis_env::redis_url().await;
    let redis_proxy = FaultProxy::start(&host_port(&redis_url)).await;
    let pg_proxy = FaultProxy::start(&host_port(&env::database_url())).await;
    let pg_url = env::database_url().replace(
        &host_port(&env::database_url()),
        &pg_proxy.addr().to_string(),
    );
    // Only the caller's calls reach the servers: no backplane, no change feed (each has a
    // connection and a reconnection back-off of its own).
    let storage = UserConfigStorage::builder()
        .redis_tier(Arc::new(
            RedisTier::builder()
                .url(format!("redis://{}/", redis_proxy.addr()))
                .prefix(redis_env::unique_prefix("cool-down"))
                .build()
                .unwrap(),
        ))
        .postgres_source(Arc::new(
            PostgresSource::builder()
                .url(pg_url)
                .schema(schema.clone())
                .build()
                .unwrap(),
        ))
        .backplane(false)
        .follow_changes(false)
        .build()
        .await
        .unwrap();
    storage
        .update_user_config("warm", &themed("warm", "v1"))
        .await
        .unwrap();
    for proxy in [&redis_proxy, &pg_proxy] {
        proxy.set_mode(ProxyMode::Reset);
        proxy.kill_connections();
    }
    let (redis_before, pg_before) = (redis_proxy.connections(), pg_proxy.connections());
    let started = Instant::now();
    const ROUNDS: usize = 300;
    for i in 0..ROUNDS {
        let err = storage
            .get_user_config(&format!("nobody-{i}"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        let err = storage.history("warm", 10).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let redis = redis_proxy.connections() - redis_before;
    let pg = pg_proxy.connections() - pg_before;
    let stats = storage.get_cache_stats();
    eprintln!(
        "{ROUNDS} rounds in {elapsed:?}: Redis asked {redis} times, PostgreSQL {pg}; \
         redis {:?}; source {:?}",
        stats.chain.tiers[1], stats.chain.source
    );
    // Every call that reached a tier asked its server (they keep no window of their own); the
    // breaker let through three, then one probe per cool-down (two of slack for the rounds
    // that straddle a cool-down's end).
    let most = 3 + (elapsed.as_millis() / DEFAULT_BREAKER_COOLDOWN.as_millis()) as u64 + 2;
    for (tier, asked) in [(&stats.chain.tiers[1], redis), (&stats.chain.source, pg)] {
        assert!(asked > 0, "{}: the server was asked at all", tier.name);
        assert!(
            tier.tier.errors <= most,
            "{}: {} calls reached the tier in {elapsed:?}, at most {most} expected: {tier:?}",
            tier.name,
            tier.tier.errors
        );
        assert!(tier.breaker_open && tier.skipped > 0, "{tier:?}");
    }
    postgres_env::drop_schema(&pool, &schema).await;
}
