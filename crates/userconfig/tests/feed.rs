//! The database's change feed on the real servers (`REDIS_URL`, `DATABASE_URL`): changes made
//! with plain SQL, behind every instance's back, reach every instance's memory and Redis; a
//! follower cut off catches up from the log without flushing, and flushes only when the log no
//! longer covers the gap; transactions that commit out of order are both applied; a write
//! that commits after its caller left reaches every cache; and all of it with Redis down.
//! The backplane is off in every instance here: what they learn, they learn from the database.

use std::sync::Arc;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use tiercache_core::CacheTier;
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{FaultProxy, ProxyMode, env, postgres_env, redis_env};
use userconfig::{UserConfig, UserConfigStorage};

/// What `probe` returns once it returns something, polled for at most 10 s (a follower cut
/// off reconnects within two seconds).
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let host = rest.rsplit('@').next().unwrap();
    host.split('/').next().unwrap().to_string()
}

struct Rig {
    pool: sqlx::PgPool,
    schema: String,
    redis: Option<Arc<RedisTier<String, UserConfig>>>,
    /// The instances' change retention (the default: an hour).
    retention: Option<Duration>,
}

impl Rig {
    async fn new(tag: &str, with_redis: bool) -> Self {
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let redis = if with_redis {
            Some(Arc::new(
                RedisTier::builder()
                    .url(redis_env::redis_url().await)
                    .prefix(redis_env::unique_prefix(tag))
                    .build()
                    .unwrap(),
            ))
        } else {
            None
        };
        Rig {
            pool,
            schema,
            redis,
            retention: None,
        }
    }

    fn postgres(&self, url: String) -> Arc<PostgresSource<String, UserConfig>> {
        let mut source = PostgresSource::builder()
            .url(url)
            .schema(self.schema.clone());
        if let Some(retention) = self.retention {
            source = source.change_retention(retention);
        }
        Arc::new(source.build().unwrap())
    }

    /// An instance straight to the database (and the shared Redis, if any), no backplane.
    async fn instance(&self) -> UserConfigStorage {
        self.instance_through(env::database_url()).await
    }

    async fn instance_through(&self, database_url: String) -> UserConfigStorage {
        let mut builder = UserConfigStorage::builder()
            .postgres_source(self.postgres(database_url))
            .backplane(false);
        if let Some(redis) = &self.redis {
            builder = builder.redis_tier(redis.clone());
        }
        builder.build().await.unwrap()
    }

    /// An instance whose database connections (its follower's included) go through a proxy
    /// the test can cut.
    async fn cuttable(&self) -> (UserConfigStorage, FaultProxy) {
        let proxy = FaultProxy::start(&host_port(&env::database_url())).await;
        let url = env::database_url()
            .replace(&host_port(&env::database_url()), &proxy.addr().to_string());
        (self.instance_through(url).await, proxy)
    }

    fn table(&self) -> String {
        format!("\"{}\".\"tiercache_entries\"", self.schema)
    }

    /// Entries in the change log for `user`.
    async fn logged(&self, user: &str) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".\"tiercache_entries_changes\" WHERE key = $1",
            self.schema
        )))
        .bind(user)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn sql(&self, statement: String) {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// The database's version of `user` (0: not stored).
    async fn version(&self, user: &str) -> u64 {
        let v: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT version FROM {} WHERE key = $1",
            self.table()
        )))
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        v.map_or(0, |v| v as u64)
    }

    async fn cleanup(self) {
        if let Some(redis) = &self.redis {
            let _ = redis.clear().await;
        }
        postgres_env::drop_schema(&self.pool, &self.schema).await;
    }
}

fn themed(user: &str, theme: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = theme.into();
    c
}

/// Waits until `storage` serves `user` at the database's version, and returns the theme.
async fn converged(rig: &Rig, storage: &UserConfigStorage, user: &str, what: &str) -> String {
    let want = rig.version(user).await;
    let what = &format!("{what} (at version {want}; {:?})", {
        let c = storage.get_cache_stats().chain;
        (c.feed_changes, c.feed_flushes)
    });
    eventually(what, || async {
        let got = storage.fetch_user_config(user).await.unwrap();
        (got.version == want).then(|| got.config.preferences.theme.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_changes_reach_every_instances_memory_and_redis() {
    let rig = Rig::new("feed_sql", true).await;
    let mut instances = Vec::new();
    for _ in 0..4 {
        instances.push(rig.instance().await);
    }
    // Every instance caches "not stored" (the defaults), then erin is inserted with SQL.
    for storage in &instances {
        assert!(!storage.fetch_user_config("erin").await.unwrap().stored);
    }
    let table = rig.table();
    rig.sql(format!(
        "INSERT INTO {table} (key, value) VALUES \
         ('erin', '{{\"user_id\": \"erin\", \"preferences\": {{\"theme\": \"dark\"}}}}')"
    ))
    .await;
    for (i, storage) in instances.iter().enumerate() {
        let theme = converged(
            &rig,
            storage,
            "erin",
            &format!("instance {i} sees the insert"),
        )
        .await;
        assert_eq!(theme, "dark");
    }
    // Updated with SQL: every memory copy, and Redis, move to the new version.
    rig.sql(format!(
        "UPDATE {table} SET value = jsonb_set(value, '{{preferences,theme}}', '\"light\"') \
         WHERE key = 'erin'"
    ))
    .await;
    for (i, storage) in instances.iter().enumerate() {
        let theme = converged(
            &rig,
            storage,
            "erin",
            &format!("instance {i} sees the update"),
        )
        .await;
        assert_eq!(theme, "light");
    }
    let version = rig.version("erin").await;
    let redis = rig.redis.as_ref().unwrap();
    let held = redis.get(&"erin".to_string()).await.unwrap();
    assert!(
        held.is_none_or(|e| e.version == version),
        "Redis holds no replaced version"
    );
    // Deleted with SQL: every instance serves the defaults again.
    rig.sql(format!("DELETE FROM {table} WHERE key = 'erin'"))
        .await;
    for (i, storage) in instances.iter().enumerate() {
        eventually(&format!("instance {i} sees the delete"), || async {
            (!storage.fetch_user_config("erin").await.unwrap().stored).then_some(())
        })
        .await;
    }
    let held = redis.get(&"erin".to_string()).await.unwrap();
    assert!(
        held.is_none_or(|e| e.is_absent()),
        "Redis holds no deleted value"
    );
    for storage in &instances {
        assert_eq!(storage.get_cache_stats().chain.feed_flushes, 0);
    }
    rig.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_follower_catches_up_and_flushes_only_past_the_log() {
    let mut rig = Rig::new("feed_cut", false).await;
    // Long enough for the first cut to be caught up, short enough to wait out for the second.
    rig.retention = Some(Duration::from_secs(3));
    let writer = rig.instance().await;
    let (follower, proxy) = rig.cuttable().await;
    let users = ["u1", "u2", "u3"];
    for user in users {
        writer
            .update_user_config(user, &themed(user, "v1"))
            .await
            .unwrap();
        converged(&rig, &follower, user, "the follower caches v1").await;
    }
    // Cut off while the writer changes every user: after reconnecting, the follower catches
    // up from the log, without emptying its memory.
    proxy.set_mode(ProxyMode::Blackhole);
    proxy.kill_connections();
    for user in users {
        writer
            .update_user_config(user, &themed(user, "v2"))
            .await
            .unwrap();
    }
    proxy.set_mode(ProxyMode::Pass);
    for user in users {
        let theme = converged(&rig, &follower, user, "the follower catches up").await;
        assert_eq!(theme, "v2");
    }
    assert_eq!(follower.get_cache_stats().chain.feed_flushes, 0);
    assert!(follower.get_cache_stats().chain.feed_changes >= 6);

    // Cut off again, and the log pruned past the gap: the follower cannot know what it
    // missed, and empties its caches.
    proxy.set_mode(ProxyMode::Blackhole);
    proxy.kill_connections();
    for user in users {
        writer
            .update_user_config(user, &themed(user, "v3"))
            .await
            .unwrap();
    }
    // The elected follower (the writer's: the other is cut off) prunes what every follower cut
    // off for less than the retention has seen, the v3 changes included once they are that old.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rig.logged("u3").await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.set_mode(ProxyMode::Pass);
    eventually("the follower flushes", || async {
        (follower.get_cache_stats().chain.feed_flushes >= 1).then_some(())
    })
    .await;
    for user in users {
        let theme = converged(&rig, &follower, user, "the follower reads v3").await;
        assert_eq!(theme, "v3");
    }
    rig.cleanup().await;
}

/// Two transactions whose versions (and log positions) are taken in one order and committed
/// in the other, while the follower reads only the log (its announcements are cut): a reader
/// of positions would skip the one that committed late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_that_commit_out_of_order_are_both_applied() {
    let rig = Rig::new("feed_order", false).await;
    let writer = rig.instance().await;
    let (follower, proxy) = rig.cuttable().await;
    for user in ["early", "late"] {
        writer
            .update_user_config(user, &themed(user, "old"))
            .await
            .unwrap();
        converged(&rig, &follower, user, "cached").await;
    }
    let table = rig.table();
    let set = |user: &str, theme: &str| {
        format!(
            "UPDATE {table} SET value = jsonb_set(value, '{{preferences,theme}}', '\"{theme}\"') \
             WHERE key = '{user}'"
        )
    };
    // `late` takes its version and position first, and commits last.
    let mut late = rig.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(set("late", "new")))
        .execute(&mut *late)
        .await
        .unwrap();
    proxy.set_mode(ProxyMode::Blackhole);
    proxy.kill_connections();
    rig.sql(set("early", "new")).await;
    proxy.set_mode(ProxyMode::Pass);
    let theme = converged(&rig, &follower, "early", "early applied").await;
    assert_eq!(theme, "new");
    // The follower has read past `late`'s position; `late` commits now, its announcement lost.
    proxy.set_mode(ProxyMode::Blackhole);
    proxy.kill_connections();
    late.commit().await.unwrap();
    proxy.set_mode(ProxyMode::Pass);
    let theme = converged(&rig, &follower, "late", "late applied").await;
    assert_eq!(theme, "new");
    assert_eq!(follower.get_cache_stats().chain.feed_flushes, 0);
    rig.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_commits_after_its_caller_left_reaches_every_cache() {
    let rig = Rig::new("feed_late", true).await;
    let (a, b) = (rig.instance().await, rig.instance().await);
    a.update_user_config("fay", &themed("fay", "old"))
        .await
        .unwrap();
    for storage in [&a, &b] {
        converged(&rig, storage, "fay", "cached").await;
    }
    // The row is locked: a's write waits, and its caller gives up.
    let mut lock = rig.pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE key = 'fay' FOR UPDATE",
        rig.table()
    )))
    .execute(&mut *lock)
    .await
    .unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        a.update_user_config("fay", &themed("fay", "new")),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the caller gave up before the write committed"
    );
    lock.rollback().await.unwrap();
    // The write committed after its caller left: every cache, the writer's too, serves it.
    for (name, storage) in [("a", &a), ("b", &b)] {
        let theme = eventually(&format!("{name} serves the late write"), || async {
            let got = storage.fetch_user_config("fay").await.unwrap();
            (got.config.preferences.theme == "new").then_some(got.version)
        })
        .await;
        assert_eq!(theme, rig.version("fay").await);
    }
    rig.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_other_instances_still_drop_the_old_version() {
    let pool = postgres_env::postgres_pool().await;
    let rig = Rig::new("feed_noredis", false).await;
    drop(pool);
    let redis_proxy = FaultProxy::start(&host_port(&redis_env::redis_url().await)).await;
    let prefix = redis_env::unique_prefix("feed_noredis");
    let instance = || async {
        UserConfigStorage::builder()
            .postgres_source(rig.postgres(env::database_url()))
            .redis_tier(Arc::new(
                RedisTier::builder()
                    .url(format!("redis://{}/", redis_proxy.addr()))
                    .prefix(prefix.clone())
                    .build()
                    .unwrap(),
            ))
            .build()
            .await
            .unwrap()
    };
    let (a, b) = (instance().await, instance().await);
    a.update_user_config("gus", &themed("gus", "old"))
        .await
        .unwrap();
    converged(&rig, &b, "gus", "b caches the old version").await;
    // Redis goes down (and the backplane with it); a's update reaches the database.
    redis_proxy.set_mode(ProxyMode::Reset);
    redis_proxy.kill_connections();
    a.update_user_config("gus", &themed("gus", "new"))
        .await
        .unwrap();
    let theme = converged(&rig, &b, "gus", "b drops the old version").await;
    assert_eq!(theme, "new");
    rig.cleanup().await;
}
