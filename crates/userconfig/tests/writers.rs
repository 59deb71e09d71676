//! Several writers on one user, on the real servers (`REDIS_URL`, `DATABASE_URL`) and on a
//! shared SQLite file: concurrent read-modify-writes lose nothing, compare-and-set refuses a
//! stale version, and a delete followed by a write reaches every instance.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tiercache_sqlite::SqliteSource;
use tiercache_testkit::env;
use userconfig::{Error, UserConfig, UserConfigStorage};

mod support;
use support::Servers;

const INSTANCES: usize = 4;
const TASKS: usize = 2;
const INCREMENTS: usize = 50;

/// The counter the increments change, kept in a field `UserConfig` does not know (it survives
/// every round trip).
fn counter(config: &UserConfig) -> i64 {
    config
        .extra
        .get("counter")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0)
}

fn increment(config: &mut UserConfig) {
    let next = counter(config) + 1;
    config.extra.insert("counter".into(), json!(next));
}

/// 4 instances x 2 tasks x 50 `modify_user_config` increments of one counter.
async fn increments_from_every_instance(instances: &[UserConfigStorage]) {
    let mut tasks = Vec::new();
    for storage in instances {
        for _ in 0..TASKS {
            let storage = storage.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    storage
                        .modify_user_config("counted", increment)
                        .await
                        .expect("an increment");
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stored = instances[0].load_user_config("counted").await.unwrap();
    assert_eq!(
        counter(&stored.config),
        (INSTANCES * TASKS * INCREMENTS) as i64,
        "every increment of every instance is in the database"
    );
}

/// What `probe` returns once it returns something, polled for at most 5 s (the other instances
/// apply a change within milliseconds; a test must not assume they already did).
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_modifications_lose_nothing_on_postgres() {
    let servers = Servers::new("modify").await;
    let instances = servers.instances(INSTANCES).await;
    increments_from_every_instance(&instances).await;
    servers.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_modifications_lose_nothing_on_sqlite() {
    let dir = std::env::temp_dir().join(env::unique_name("writers"));
    let file = dir.join("shared.sqlite3");
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        let sqlite = SqliteSource::builder().path(&file).build().await.unwrap();
        instances.push(
            UserConfigStorage::builder()
                .sqlite_source(Arc::new(sqlite))
                .build()
                .await
                .unwrap(),
        );
    }
    increments_from_every_instance(&instances).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_stale_compare_and_set_is_a_typed_conflict_that_writes_nothing() {
    let servers = Servers::new("cas").await;
    let [a, b]: [UserConfigStorage; 2] = servers.instances(2).await.try_into().unwrap();
    let mut config = UserConfig::default_for("carol");
    config.preferences.theme = "dark".into();
    let v1 = a.update_user_config_if("carol", 0, &config).await.unwrap();
    config.preferences.theme = "light".into();
    let v2 = b.update_user_config_if("carol", v1, &config).await.unwrap();
    config.preferences.theme = "blue".into();
    let err = a
        .update_user_config_if("carol", v1, &config)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { expected, current } if expected == v1 && current == v2),
        "{err:?}"
    );
    assert_eq!(err.conflict(), Some(v2));
    let stored = a.load_user_config("carol").await.unwrap();
    assert_eq!(
        (stored.version, stored.config.preferences.theme.as_str()),
        (v2, "light")
    );
    servers.cleanup().await;
}

#[tokio::test]
async fn a_stale_conditional_delete_is_a_conflict_that_deletes_nothing() {
    let servers = Servers::new("cas_delete").await;
    let [a, b]: [UserConfigStorage; 2] = servers.instances(2).await.try_into().unwrap();
    let mut config = UserConfig::default_for("erin");
    config.preferences.theme = "dark".into();
    let v1 = a.update_user_config("erin", &config).await.unwrap();
    // `b` caches v1, then `a` writes v2: `b`'s delete against v1 must not remove v2.
    assert_eq!(b.fetch_user_config("erin").await.unwrap().version, v1);
    config.preferences.theme = "light".into();
    let v2 = a.update_user_config_if("erin", v1, &config).await.unwrap();
    let err = b.delete_user_config_if("erin", v1).await.unwrap_err();
    assert!(
        matches!(err, Error::Conflict { expected, current } if expected == v1 && current == v2),
        "{err:?}"
    );
    let stored = b.load_user_config("erin").await.unwrap();
    assert_eq!(
        (stored.version, stored.config.preferences.theme.as_str()),
        (v2, "light")
    );
    // Against the stored version it deletes; then nothing is stored, which is version 0.
    let gone = b.delete_user_config_if("erin", v2).await.unwrap();
    assert!(gone > v2);
    assert!(!b.fetch_user_config("erin").await.unwrap().stored);
    let err = a.delete_user_config_if("erin", gone).await.unwrap_err();
    assert_eq!(err.conflict(), Some(0), "{err:?}");
    assert_eq!(a.delete_user_config_if("erin", 0).await.unwrap(), 0);
    servers.cleanup().await;
}

#[tokio::test]
async fn a_deleted_user_reads_as_defaults_and_a_later_write_wins_everywhere() {
    let servers = Servers::new("delete").await;
    let instances = servers.instances(3).await;
    let mut config = UserConfig::default_for("dave");
    config.preferences.theme = "dark".into();
    let v1 = instances[0]
        .update_user_config("dave", &config)
        .await
        .unwrap();
    for storage in &instances {
        let got = storage.fetch_user_config("dave").await.unwrap();
        assert_eq!((got.version, got.stored), (v1, true));
    }
    let gone = instances[1].delete_user_config("dave").await.unwrap();
    assert!(gone > v1);
    // Every instance stops serving the deleted configuration soon after (the other instances
    // are told), without waiting for a TTL.
    for (i, storage) in instances.iter().enumerate() {
        let got = eventually(
            &format!("instance {i} drops the deleted configuration"),
            || {
                let storage = storage.clone();
                async move {
                    let got = storage.fetch_user_config("dave").await.unwrap();
                    (!got.stored).then_some(got)
                }
            },
        )
        .await;
        assert_eq!(got.version, 0);
        assert_eq!(
            got.config.preferences.theme,
            UserConfig::default().preferences.theme
        );
    }
    assert_eq!(instances[2].delete_user_config("dave").await.unwrap(), 0);
    config.preferences.theme = "light".into();
    let v3 = instances[2]
        .update_user_config_if("dave", 0, &config)
        .await
        .unwrap();
    assert!(v3 > gone);
    for (i, storage) in instances.iter().enumerate() {
        let got = eventually(&format!("instance {i} serves the new write"), || {
            let storage = storage.clone();
            async move {
                let got = storage.fetch_user_config("dave").await.unwrap();
                (got.version == v3).then_some(got)
            }
        })
        .await;
        assert_eq!(got.config.preferences.theme, "light");
    }
    servers.cleanup().await;
}
