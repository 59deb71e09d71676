//! Redis hangs (its process stopped with SIGSTOP, connections open, nothing answering) while
//! one of three instances updates users, then goes on. Two promises:
//!
//! * during the hang an update costs its database write plus at most the Redis time limit
//!   (not a reconnection per call, not a publish retried inline);
//! * soon after Redis answers again (the requirement is 1 s), no instance serves a version
//!   replaced during the hang.
//!
//! The test starts a Redis of its own on a spare port (the shared one is never paused) and
//! uses the shared PostgreSQL (`DATABASE_URL`) in a schema of its own. `HANG_SECS` sets how long
//! Redis hangs (default 3 s; the figures in docs/performance.md use 20, with `--release`), and
//! the test prints what it measured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::redis_env::LocalRedis;
use tiercache_testkit::{FaultProxy, ProxyMode, env, postgres_env, redis_env};
use userconfig::{UserConfig, UserConfigStorage};

const USERS: usize = 10;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn themed(user: &str, theme: &str) -> UserConfig {
    let mut config = UserConfig::default_for(user);
    config.preferences.theme = theme.into();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_an_update_its_limit_and_no_instance_serves_a_replaced_version_after() {
    let Some(redis) = LocalRedis::start().await else {
        return;
    };
    let hang = Duration::from_secs(
        std::env::var("HANG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let postgres = Arc::new(
        PostgresSource::builder()
            .url(env::database_url())
            .schema(schema.clone())
            .build()
            .unwrap(),
    );
    let prefix = redis_env::unique_prefix("hang");
    let mut instances = Vec::new();
    for _ in 0..3 {
        // Each instance its own Redis connection, as separate processes would have.
        let tier = RedisTier::builder()
            .url(redis.url())
            .prefix(prefix.clone())
            .build()
            .unwrap();
        let storage = UserConfigStorage::builder()
            .redis_tier(Arc::new(tier))
            .postgres_source(postgres.clone())
            .backplane(true)
            .build()
            .await
            .unwrap();
        assert!(storage.backplane().unwrap().is_subscribed());
        instances.push(storage);
    }
    let limit = instances[0].redis().unwrap().timeout();
    let users: Vec<String> = (0..USERS).map(|i| format!("hang-{i}")).collect();

    // Before: version 1 of every user, held in the two readers' memory.
    let mut before = Vec::new();
    for user in &users {
        let started = Instant::now();
        instances[0]
            .update_user_config(user, &themed(user, "before"))
            .await
            .unwrap();
        before.push(started.elapsed());
    }
    for reader in &instances[1..] {
        for user in &users {
            let got = reader.fetch_user_config(user).await.unwrap();
            assert_eq!(got.config.preferences.theme, "before");
        }
    }

    // The hang: instance 0 updates every user.
    redis.pause();
    let paused = Instant::now();
    let mut during = Vec::new();
    for user in &users {
        let started = Instant::now();
        instances[0]
            .update_user_config(user, &themed(user, "during"))
            .await
            .unwrap();
        during.push(started.elapsed());
    }
    tokio::time::sleep(hang.saturating_sub(paused.elapsed())).await;
    redis.resume();
    let resumed = Instant::now();

    // After: how long until both readers serve the new version of every user.
    let deadline = resumed + Duration::from_secs(10);
    let mut coherent_after = None;
    while Instant::now() < deadline {
        let mut stale = 0;
        for reader in &instances[1..] {
            for user in &users {
                // A read may fail while the instances reconnect; that is not a stale read.
                if let Ok(got) = reader.fetch_user_config(user).await
                    && got.config.preferences.theme != "during"
                {
                    stale += 1;
                }
            }
        }
        if stale == 0 {
            coherent_after = Some(resumed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (before_median, during_median) = (median(before.clone()), median(during.clone()));
    let during_max = during.iter().max().copied().unwrap_or_default();
    eprintln!("updates with Redis up: {before:?}\nupdates during the hang: {during:?}");
    eprintln!(
        "hang of {hang:?}: update median {before_median:?} with Redis up, {during_median:?} \
         during the hang (max {during_max:?}; Redis limit {limit:?}); both readers serve every \
         new version {coherent_after:?} after Redis answers again"
    );
    // A wall-clock bound, compared with this run's own baseline and the configured limit: the
    // code this replaced took 2.15 s per update here (a reconnection and an inline publish).
    assert!(
        during_median <= before_median + limit * 2,
        "an update during the hang took {during_median:?} (median), against {before_median:?} \
         with Redis up and a Redis limit of {limit:?}"
    );
    let coherent_after = coherent_after
        .expect("the readers still serve replaced versions 10 s after Redis came back");
    // The requirement is 1 s; the test allows some slack for a loaded machine.
    assert!(
        coherent_after <= Duration::from_secs(3),
        "replaced versions were served for {coherent_after:?} after Redis came back"
    );
    for storage in &instances {
        storage.flush(Duration::from_secs(5)).await.unwrap();
    }
    postgres_env::drop_schema(&pool, &schema).await;
}

/// Redis hangs for 1.2 s (a partition: a proxy swallows everything, so nothing sent meanwhile
/// ever runs) while every user is changed with plain SQL: the database takes the changes, the
/// feed's elected follower cannot apply them to Redis, which keeps the replaced copies. An
/// instance started 100 ms after Redis answers again knows nothing of what was missed: it reads
/// the replaced copies from Redis into its memory. The instances that missed the changes replay
/// them as soon as Redis answers (not at the end of a back-off) and tell the others on the
/// backplane, so that the new instance serves no replaced version after the first second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_is_repaired_within_a_second_of_answering_again_for_an_instance_started_after() {
    let redis_url = redis_env::redis_url().await;
    let proxy = FaultProxy::start(&host_port(&redis_url)).await;
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let prefix = redis_env::unique_prefix("repair");
    let instance = |url: String| {
        let (prefix, schema) = (prefix.clone(), schema.clone());
        async move {
            let tier = RedisTier::builder()
                .url(url)
                .prefix(prefix)
                .build()
                .unwrap();
            let source = PostgresSource::builder()
                .url(env::database_url())
                .schema(schema)
                .build()
                .unwrap();
            UserConfigStorage::builder()
                .redis_tier(Arc::new(tier))
                .postgres_source(Arc::new(source))
                .build()
                .await
                .unwrap()
        }
    };
    let through_proxy = format!("redis://{}/", proxy.addr());
    let (a, b) = (
        instance(through_proxy.clone()).await,
        instance(through_proxy).await,
    );
    let users: Vec<String> = (0..USERS).map(|i| format!("repair-{i}")).collect();
    for user in &users {
        a.update_user_config(user, &themed(user, "before"))
            .await
            .unwrap();
        assert_eq!(
            b.fetch_user_config(user)
                .await
                .unwrap()
                .config
                .preferences
                .theme,
            "before"
        );
    }
    proxy.set_mode(ProxyMode::Blackhole);
    let hung = Instant::now();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE \"{schema}\".tiercache_entries \
         SET value = jsonb_set(value, '{{preferences,theme}}', '\"during\"')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(hung.elapsed())).await;
    // Redis answers again (the swallowed connections are reset, new ones pass).
    proxy.set_mode(ProxyMode::Pass);
    proxy.kill_connections();
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Straight to Redis: it knows nothing of the proxy's past.
    let fresh = instance(redis_url).await;
    let mut last_stale = None;
    let mut stale_reads = 0;
    while resumed.elapsed() < Duration::from_secs(3) {
        for user in &users {
            if let Ok(got) = fresh.fetch_user_config(user).await
                && got.config.preferences.theme == "before"
            {
                last_stale = Some(resumed.elapsed());
                stale_reads += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "the new instance served {stale_reads} replaced versions, the last {last_stale:?} after \
         Redis answered"
    );
    assert!(
        last_stale.is_none_or(|at| at <= Duration::from_secs(1)),
        "the new instance served a replaced version {last_stale:?} after Redis answered again"
    );
    for storage in [&a, &b, &fresh] {
        storage.flush(Duration::from_secs(5)).await.unwrap();
    }
    if let Some(redis) = fresh.redis() {
        use tiercache_core::CacheTier as _;
        let _ = redis.clear().await;
    }
    postgres_env::drop_schema(&pool, &schema).await;
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let host = rest.rsplit('@').next().unwrap();
    host.split('/').next().unwrap().to_string()
}
