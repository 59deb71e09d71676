//! No configuration value, password or full connection URL ever reaches the logs or `Debug`
//! output: every tracing event at TRACE level is captured across success and error paths, with
//! a sentinel password and a sentinel configuration value, and neither may appear.
//!
//! The Redis user of this test has the least-privilege ACL of `docs/security.md`: the test
//! also proves that ACL is enough.

use std::sync::Arc;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use tiercache_core::{CacheTier, Source};
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{Captured, env, postgres_env, redis_env};
use userconfig::{Answer, UserConfig, UserConfigStorage};

const PASSWORD: &str = "s3cret-sentinel-pw-7d1e";
const CONFIG_VALUE: &str = "sentinel-config-value-4b9c";

fn chain_of(e: &dyn std::error::Error) -> String {
    let mut text = format!("{e} / {e:?}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(" / {s} / {s:?}"));
        source = s.source();
    }
    text
}

/// The least-privilege ACL from docs/security.md, for `prefix` (keys and the backplane
/// channel).
fn acl_rules(prefix: &str) -> Vec<String> {
    [
        "reset",
        "on",
        &format!(">{PASSWORD}"),
        &format!("~{prefix}*"),
        &format!("&{prefix}invalidations"),
        "+get",
        "+mget",
        "+set",
        "+del",
        "+unlink",
        "+pttl",
        "+scan",
        "+eval",
        "+evalsha",
        "+script|load",
        "+publish",
        "+subscribe",
        "+ping",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_configuration_value_is_ever_logged_or_printed() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    // A Redis user with the sentinel password and the least-privilege ACL.
    let admin = redis_env::redis_client().await;
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let prefix = redis_env::unique_prefix("secrets");
    let user = env::unique_name("acl");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg(acl_rules(&prefix))
        .query_async(&mut con)
        .await
        .unwrap();
    let redis_host = env::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let redis_url = format!("redis://{user}:{PASSWORD}@{redis_host}/");
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    // Trust authentication ignores the password; it is in the URL all the same.
    let pg_url =
        env::database_url().replacen("://postgres@", &format!("://postgres:{PASSWORD}@"), 1);
    assert!(
        pg_url.contains(PASSWORD),
        "DATABASE_URL must name user postgres: {}",
        env::database_url()
    );

    let redis = Arc::new(
        RedisTier::builder()
            .url(&redis_url)
            .prefix(&prefix)
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    );
    let postgres = Arc::new(
        PostgresSource::builder()
            .url(&pg_url)
            .schema(&schema)
            .build()
            .unwrap(),
    );
    let builder = UserConfigStorage::builder()
        .redis_url(&redis_url)
        .database_url(&pg_url);
    captured.note(format!("{builder:?}"));
    let storage = UserConfigStorage::builder()
        .redis_tier(redis.clone())
        .postgres_source(postgres.clone())
        .backplane(true)
        .build()
        .await
        .unwrap();
    captured.note(format!("{storage:?} {redis:?} {postgres:?}"));

    // Success paths: update, reads from each tier, invalidation, stats.
    let mut config = UserConfig::default_for("alice");
    config.preferences.theme = CONFIG_VALUE.into();
    storage.update_user_config("alice", &config).await.unwrap();
    assert_eq!(
        storage
            .get_user_config("alice")
            .await
            .unwrap()
            .preferences
            .theme,
        CONFIG_VALUE
    );
    storage.clear_memory_cache().await;
    let from_redis = storage.fetch_user_config("alice").await.unwrap();
    assert_eq!(from_redis.config.preferences.theme, CONFIG_VALUE);
    assert_eq!(
        from_redis.answered_by,
        Answer::Redis,
        "the ACL lets the tier read what it wrote"
    );
    storage.invalidate_user_config_cache("alice").await.unwrap();
    assert_eq!(
        storage
            .get_user_config("alice")
            .await
            .unwrap()
            .preferences
            .theme,
        CONFIG_VALUE
    );
    // The ACL is enough: no command of the tier or the backplane was refused, and the
    // backplane both published and listened.
    storage
        .flush(Duration::from_secs(5))
        .await
        .expect("every publish went out");
    let stats = storage.get_cache_stats();
    let redis_stats = stats.redis_cache.stats.as_ref().expect("a Redis tier");
    assert_eq!(
        redis_stats.errors, 0,
        "a command was refused: {redis_stats:?}"
    );
    let backplane = stats.backplane.expect("a backplane");
    assert!(
        backplane.subscribed && backplane.published >= 2 && backplane.publish_errors == 0,
        "{backplane:?}"
    );
    redis.clear().await.unwrap();
    captured.note(format!("{:?}", storage.get_cache_stats()));
    captured.note(format!(
        "{:?}",
        storage.fetch_user_config("alice").await.unwrap()
    ));

    // Error paths: a corrupt row holding the value, corrupt bytes in Redis, a wrong user,
    // a database that is down, an oversize config.
    // Bound, not spliced: sqlx logs statements, and this one's text must not hold the value.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = $1::jsonb WHERE key = 'alice'",
        postgres.qualified_table()
    )))
    .bind(format!("{{\"preferences\": \"{CONFIG_VALUE}\"}}"))
    .execute(&pool)
    .await
    .unwrap();
    storage.invalidate_user_config_cache("alice").await.unwrap();
    let err = storage.get_user_config("alice").await.unwrap_err();
    assert!(err.is_corrupt());
    captured.note(chain_of(&err));

    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}bob"))
        .arg(format!(
            "TC\u{2}\u{0}\0\0\0\0\0\0\0\u{1}\0\0\0\0\0\0\0\0{{\"theme\": {CONFIG_VALUE}}}"
        ))
        .query_async(&mut con)
        .await
        .unwrap();
    storage.clear_memory_cache().await;
    let corrupt_before = storage.get_cache_stats().redis_cache.stats.unwrap().corrupt;
    let bob = storage.get_user_config("bob").await.unwrap();
    assert_eq!(
        *bob,
        UserConfig::default_for("bob"),
        "a miss, not the corrupt bytes"
    );
    assert_eq!(
        storage.get_cache_stats().redis_cache.stats.unwrap().corrupt,
        corrupt_before + 1,
        "the corrupt entry was counted"
    );

    let stranger: RedisTier<String, UserConfig> = RedisTier::builder()
        .url(format!("redis://nobody_{user}:{PASSWORD}@{redis_host}/"))
        .build()
        .unwrap();
    let err = stranger.get(&"alice".into()).await.unwrap_err();
    captured.note(chain_of(&err));

    let down: PostgresSource<String, UserConfig> = PostgresSource::builder()
        .url(format!("postgres://postgres:{PASSWORD}@127.0.0.1:1/test"))
        .build()
        .unwrap();
    let err = down.get(&"alice".into()).await.unwrap_err();
    captured.note(chain_of(&err));
    captured.note(format!("{down:?}"));

    let mut big = UserConfig::default_for("carol");
    big.image_generation.negative_prompt = CONFIG_VALUE.repeat(5000);
    let err = storage.update_user_config("carol", &big).await.unwrap_err();
    captured.note(chain_of(&err));

    let bad_url = UserConfigStorage::builder()
        .database_url(format!("mysql://root:{PASSWORD}@db/x"))
        .build()
        .await
        .unwrap_err();
    captured.note(chain_of(&bad_url));

    // Let background tasks log what they will.
    let _ = storage.flush(Duration::from_secs(2)).await;
    let text = captured.text();
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "the capture saw events: {} bytes",
        text.len()
    );
    assert!(text.contains("tier call failed"), "error paths were logged");
    assert!(!text.contains(PASSWORD), "a password leaked:\n{text}");
    assert!(
        !text.contains(CONFIG_VALUE),
        "a configuration value leaked:\n{text}"
    );

    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut con)
        .await
        .unwrap();
    postgres_env::drop_schema(&pool, &schema).await;
}
