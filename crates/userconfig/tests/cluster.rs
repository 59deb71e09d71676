//! `UserConfigStorage` over a Redis Cluster (feature `cluster`): two service instances share a
//! three-master cluster this test builds from `redis-server` processes and one SQLite file;
//! reads back-fill the cluster, updates reach the other instance. Skipped, loudly, only where
//! `redis-server` is not installed.

#![cfg(feature = "cluster")]

use std::time::Duration;

use tiercache_testkit::env;
use tiercache_testkit::redis_env::LocalCluster;
use userconfig::{Answer, Error, UserConfigStorage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_redis_cluster() {
    let Some(cluster) = LocalCluster::start(3).await else {
        return;
    };
    let db = std::env::temp_dir().join(format!("{}.sqlite3", env::unique_name("uc_cluster")));
    let prefix = format!("{}:", env::unique_name("uc_cluster"));
    let a = UserConfigStorage::builder()
        .redis_cluster(cluster.nodes())
        .redis_prefix(prefix.clone())
        .sqlite_path(&db)
        .backplane(true)
        .build()
        .await
        .unwrap();
    let b = UserConfigStorage::builder()
        .redis_cluster(cluster.nodes())
        .redis_prefix(prefix)
        .share_database(&a)
        .backplane(true)
        .build()
        .await
        .unwrap();
    for s in [&a, &b] {
        let backplane = s.backplane().expect("the backplane is on with Redis");
        for _ in 0..500 {
            if backplane.is_subscribed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(backplane.is_subscribed());
    }

    // Users spread over the cluster's slots: written by a, read by b from the cluster.
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    for user in &users {
        let mut config = (*a.get_user_config(user).await.unwrap()).clone();
        config.preferences.theme = format!("theme-{user}");
        a.update_user_config(user, &config).await.unwrap();
    }
    for user in &users {
        let got = b.fetch_user_config(user).await.unwrap();
        assert_eq!(got.config.preferences.theme, format!("theme-{user}"));
        assert_eq!(got.answered_by, Answer::Redis, "{user}");
    }
    let stats = b.get_cache_stats();
    assert!(stats.redis_cache.connected);
    assert_eq!(stats.redis_cache.stats.as_ref().unwrap().hits, 40);

    // An update on a reaches b: the backplane replaces b's memory copy, or the database's feed
    // drops it first (then b reads the new version from the cluster).
    let mut config = (*b.get_user_config("user-7").await.unwrap()).clone();
    config.preferences.theme = "changed".into();
    let version = a.update_user_config("user-7", &config).await.unwrap();
    let mut seen = None;
    for _ in 0..500 {
        let got = b.fetch_user_config("user-7").await.unwrap();
        if got.version == version {
            seen = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = seen.expect("b sees the update");
    assert_eq!(seen.config.preferences.theme, "changed");
    assert!(
        matches!(seen.answered_by, Answer::Memory | Answer::Redis),
        "{:?}",
        seen.answered_by
    );

    for suffix in ["", "-wal", "-shm"] {
        let mut path = db.clone().into_os_string();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
}

#[tokio::test]
async fn one_server_and_a_cluster_together_are_a_settings_error() {
    let err = UserConfigStorage::builder()
        .redis_url("redis://127.0.0.1:6379/")
        .redis_cluster(["redis://127.0.0.1:7000/"])
        .sqlite_path(":memory:")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Settings(_)), "{err:?}");
}
