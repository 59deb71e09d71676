//! Every seed flow end to end against the real local Redis and PostgreSQL (`REDIS_URL`,
//! `DATABASE_URL`): each test has its own Redis prefix and its own PostgreSQL schema, so the
//! tests run in parallel.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::AssertSqlSafe;
use tiercache_core::{CacheTier, Entry, Source};
use tiercache_postgres::PostgresSource;
use tiercache_testkit::{env, postgres_env, redis_env};
use userconfig::{Answer, UserConfig, UserConfigStorage};

mod support;
use support::Servers;

fn themed(user: &str, theme: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = theme.into();
    c
}

#[tokio::test]
async fn a_get_is_answered_by_each_tier_in_turn_with_back_fill() {
    let s = Servers::new("tiers").await;
    let a = s.instance().await;
    a.update_user_config("alice", &themed("alice", "dark"))
        .await
        .unwrap();

    // Another instance: empty memory, so Redis answers and back-fills its memory.
    let b = s.instance().await;
    let got = b.fetch_user_config("alice").await.unwrap();
    assert_eq!(
        (got.answered_by, got.version),
        (Answer::Redis, 1),
        "{got:?}"
    );
    assert_eq!(
        b.fetch_user_config("alice").await.unwrap().answered_by,
        Answer::Memory
    );

    // With Redis emptied too, the database answers and both caches are filled again.
    s.redis.clear().await.unwrap();
    let c = s.instance().await;
    let got = c.fetch_user_config("alice").await.unwrap();
    assert_eq!(got.answered_by, Answer::Database);
    assert_eq!(got.config.preferences.theme, "dark");
    // Redis is back-filled in the background, after the answer.
    c.flush(Duration::from_secs(5)).await.unwrap();
    let in_redis = s
        .redis
        .get(&"alice".into())
        .await
        .unwrap()
        .map(|e| e.version);
    assert_eq!(in_redis, Some(1));
    assert_eq!(
        c.fetch_user_config("alice").await.unwrap().answered_by,
        Answer::Memory
    );
    let stats = c.get_cache_stats();
    assert!(stats.redis_cache.enabled && stats.redis_cache.connected);
    assert_eq!(stats.database.backend, "postgres");
    assert_eq!(stats.database.loads, 1);
    s.cleanup().await;
}

#[tokio::test]
async fn an_update_reaches_every_tier_and_other_instances_via_redis() {
    let s = Servers::new("update").await;
    let a = s.instance().await;
    let b = s.instance().await;
    a.update_user_config("bob", &themed("bob", "v1"))
        .await
        .unwrap();
    assert_eq!(
        b.get_user_config("bob").await.unwrap().preferences.theme,
        "v1"
    );

    let v = a
        .update_user_config("bob", &themed("bob", "v2"))
        .await
        .unwrap();
    assert_eq!(v, 2);
    let in_redis = s.redis.get(&"bob".into()).await.unwrap().unwrap();
    assert_eq!(in_redis.version, 2);
    let in_db = s.postgres.get(&"bob".into()).await.unwrap().unwrap();
    assert_eq!(in_db.value.unwrap().preferences.theme, "v2");
    // Instance b serves v2 within milliseconds.
    let mut got = b.fetch_user_config("bob").await.unwrap();
    for _ in 0..500 {
        if got.version == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        got = b.fetch_user_config("bob").await.unwrap();
    }
    assert_eq!(
        (got.version, got.config.preferences.theme.as_str()),
        (2, "v2")
    );
    // The backplane replaces b's copy in place (a memory hit), unless the database's feed
    // dropped it first (then b read v2 from Redis).
    assert!(
        matches!(got.answered_by, Answer::Memory | Answer::Redis),
        "{:?}",
        got.answered_by
    );
    assert!(b.get_cache_stats().backplane.unwrap().received >= 1);
    s.cleanup().await;
}

#[tokio::test]
async fn invalidation_and_memory_clear_send_reads_down() {
    let s = Servers::new("invalidate").await;
    let a = s.instance().await;
    a.update_user_config("carol", &themed("carol", "x"))
        .await
        .unwrap();
    a.invalidate_user_config_cache("carol").await.unwrap();
    assert!(s.redis.get(&"carol".into()).await.unwrap().is_none());
    assert_eq!(
        a.fetch_user_config("carol").await.unwrap().answered_by,
        Answer::Database
    );
    // Redis is back-filled in the background; once it is, a memory miss finds it there. (Not
    // `flush`: that would also wait for the invalidation's second pass, which empties Redis.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while s.redis.get(&"carol".into()).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis back-filled in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.clear_memory_cache().await;
    assert_eq!(a.get_cache_stats().memory_cache.entries, 0);
    assert_eq!(
        a.fetch_user_config("carol").await.unwrap().answered_by,
        Answer::Redis
    );
    s.cleanup().await;
}

#[tokio::test]
async fn unknown_users_get_defaults_and_nothing_is_written() {
    let s = Servers::new("defaults").await;
    let a = s.instance().await;
    let c = a.get_user_config("nobody").await.unwrap();
    assert_eq!(*c, UserConfig::default_for("nobody"));
    assert!(s.postgres.get(&"nobody".into()).await.unwrap().is_none());
    s.cleanup().await;
}

#[tokio::test]
async fn unknown_fields_survive_redis_and_postgres() {
    let s = Servers::new("unknown").await;
    let a = s.instance().await;
    let newer: UserConfig = serde_json::from_value(json!({
        "user_id": "dave",
        "preferences": {"theme": "dark", "accent_colour": "teal"},
        "voice": {"enabled": true, "speed": 1.25}
    }))
    .unwrap();
    a.update_user_config("dave", &newer).await.unwrap();
    // Read back through Redis by a fresh instance, modify, write.
    let b = s.instance().await;
    let mut c = (*b.get_user_config("dave").await.unwrap()).clone();
    c.preferences.font_size = 20;
    b.update_user_config("dave", &c).await.unwrap();
    // And through the database alone.
    s.redis.clear().await.unwrap();
    let fresh = s.instance().await;
    let back = serde_json::to_value(&*fresh.get_user_config("dave").await.unwrap()).unwrap();
    assert_eq!(back["preferences"]["accent_colour"], "teal");
    assert_eq!(back["voice"]["speed"], 1.25);
    assert_eq!(back["preferences"]["font_size"], 20);
    let row: (serde_json::Value,) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT value FROM {} WHERE key = 'dave'",
        s.postgres.qualified_table()
    )))
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(row.0["voice"]["enabled"], true);
    s.cleanup().await;
}

#[tokio::test]
async fn corrupt_bytes_in_redis_are_a_miss_and_the_database_answers() {
    let s = Servers::new("corrupt").await;
    let a = s.instance().await;
    a.update_user_config("erin", &themed("erin", "ok"))
        .await
        .unwrap();
    // The change feed's elected follower applies the write to Redis once for the fleet, some
    // milliseconds later; bytes corrupted before that would be replaced by it, and the read
    // below would find no corrupt copy. Wait until it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !a
        .get_cache_stats()
        .chain
        .feed
        .is_some_and(|f| f.elected && f.lag.count >= 1)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feed never applied the write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let client = redis_env::redis_client().await;
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key = s.redis.redis_key(&"erin".to_string());
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(b"\x00garbage\xff".as_slice())
        .query_async(&mut con)
        .await
        .unwrap();
    let b = s.instance().await;
    let got = b.fetch_user_config("erin").await.unwrap();
    assert_eq!(got.answered_by, Answer::Database);
    assert_eq!(got.config.preferences.theme, "ok");
    assert_eq!(b.get_cache_stats().redis_cache.stats.unwrap().corrupt, 1);
    // The corrupt value is replaced by the (background) back-fill.
    b.flush(Duration::from_secs(5)).await.unwrap();
    let in_redis = s
        .redis
        .get(&"erin".into())
        .await
        .unwrap()
        .map(|e| e.version);
    assert_eq!(in_redis, Some(1));
    s.cleanup().await;
}

#[tokio::test]
async fn corrupt_json_in_the_database_is_an_error_naming_the_user_not_defaults() {
    let s = Servers::new("badrow").await;
    let a = s.instance().await;
    a.update_user_config("frank", &themed("frank", "x"))
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = '{{\"preferences\": \"not an object\"}}', version = version + 1 WHERE key = 'frank'",
        s.postgres.qualified_table()
    )))
    .execute(&s.pool)
    .await
    .unwrap();
    a.invalidate_user_config_cache("frank").await.unwrap();
    let err = a.get_user_config("frank").await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let chain = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(chain.contains("frank"), "{chain}");
    s.cleanup().await;
}

#[tokio::test]
async fn version_conflicts_never_let_an_older_config_overwrite_a_newer_one() {
    let s = Servers::new("conflict").await;
    let a = s.instance().await;
    a.update_user_config("gina", &themed("gina", "v1"))
        .await
        .unwrap();
    a.update_user_config("gina", &themed("gina", "v2"))
        .await
        .unwrap();
    // A slow back-fill of version 1 arrives after version 2 is in Redis.
    let stale = Entry::new(Arc::new(themed("gina", "v1")), 1);
    assert!(!s.redis.set(&"gina".into(), stale).await.unwrap());
    let b = s.instance().await;
    assert_eq!(
        b.get_user_config("gina").await.unwrap().preferences.theme,
        "v2"
    );
    s.cleanup().await;
}

#[tokio::test]
async fn redis_ttl_expiry_sends_reads_to_the_database() {
    let s = Servers::with_redis_ttl("ttl", Duration::from_millis(300)).await;
    let a = s.instance().await;
    a.update_user_config("hana", &themed("hana", "x"))
        .await
        .unwrap();
    let mut expired = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.redis.get(&"hana".into()).await.unwrap().is_none() {
            expired = true;
            break;
        }
    }
    assert!(expired, "Redis expired the entry");
    let b = s.instance().await;
    assert_eq!(
        b.fetch_user_config("hana").await.unwrap().answered_by,
        Answer::Database
    );
    s.cleanup().await;
}

#[tokio::test]
async fn the_storage_starts_while_redis_is_down_and_serves_from_the_database() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let postgres = Arc::new(
        PostgresSource::builder()
            .url(env::database_url())
            .schema(schema.clone())
            .build()
            .unwrap(),
    );
    let storage = UserConfigStorage::builder()
        .redis_url("redis://127.0.0.1:1/")
        .postgres_source(postgres)
        .build()
        .await
        .unwrap();
    storage
        .update_user_config("ivan", &themed("ivan", "x"))
        .await
        .unwrap();
    storage.clear_memory_cache().await;
    let got = storage.fetch_user_config("ivan").await.unwrap();
    assert_eq!(got.answered_by, Answer::Database);
    let stats = storage.get_cache_stats();
    assert!(stats.redis_cache.enabled && !stats.redis_cache.connected);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn warming_loads_users_into_memory_and_redis_in_batches() {
    let s = Servers::new("warm").await;
    let a = s.instance().await;
    for i in 0..30 {
        let u = format!("w{i}");
        a.update_user_config(&u, &themed(&u, "x")).await.unwrap();
    }
    s.redis.clear().await.unwrap();
    let b = s.instance().await;
    let ids: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(b.warm(&ids, 16).await.unwrap(), 30);
    assert_eq!(b.get_cache_stats().database.loads, 3, "one query per batch");
    assert_eq!(
        b.fetch_user_config("w12").await.unwrap().answered_by,
        Answer::Memory
    );
    s.cleanup().await;
}
