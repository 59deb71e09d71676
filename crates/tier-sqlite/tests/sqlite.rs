//! The SQLite tier's own cases (the shared contract is in `contract.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::AssertSqlSafe;
use tiercache_core::{Source, Written};
use tiercache_sqlite::{IN_MEMORY, SqliteSource};
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::env;

type Tier = SqliteSource<String, ContractValue>;

/// A directory for one test's files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(env::unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_row_that_does_not_decode_is_an_error_naming_the_key() {
    let t = Tier::builder().path(IN_MEMORY).build().await.unwrap();
    t.write(&"alice".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = '{{\"name\": 5}}' WHERE key = 'alice'",
        t.quoted_table()
    )))
    .execute(t.pool())
    .await
    .unwrap();
    let err = t.get(&"alice".into()).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.starts_with("stored value for key `alice` does not decode: "),
        "{source}"
    );
    let err = t
        .get_many(&["bob".into(), "alice".into()])
        .await
        .unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    assert_eq!(t.stats().corrupt, 2);
    // The bad row got a version of its own from the database (the triggers number every
    // writer's change); a write replaces it and numbers on from it.
    let v = t
        .write(&"alice".into(), contract::value(2), None)
        .await
        .map(Written::version)
        .unwrap();
    assert_eq!(v, 3, "1: the first write, 2: the SQL update, 3: this write");
    assert_eq!(t.get(&"alice".into()).await.unwrap().unwrap().version, 3);
}

#[tokio::test]
async fn data_survives_reopening_and_pools_share_a_file() {
    let dir = TempDir::new("sqlite_reopen");
    let file = dir.0.join("data.sqlite3");
    let a = Tier::builder().path(&file).build().await.unwrap();
    let b = Tier::builder().path(&file).build().await.unwrap();
    a.write(&"k".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    assert_eq!(
        b.write(&"k".into(), contract::value(2), None)
            .await
            .map(Written::version)
            .unwrap(),
        2
    );
    drop((a, b));
    let again = Tier::builder().path(&file).build().await.unwrap();
    assert_eq!(again.get(&"k".into()).await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn bad_settings_are_rejected() {
    assert!(Tier::builder().table("Bad-Name").build().await.is_err());
    assert!(
        Tier::builder()
            .path(IN_MEMORY)
            .max_connections(0)
            .build()
            .await
            .is_err()
    );
    let other = Tier::builder()
        .path(IN_MEMORY)
        .table("other")
        .build()
        .await
        .unwrap();
    assert_eq!(
        other
            .write(&"k".into(), contract::value(1), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_may_open_a_new_file_at_the_same_time() {
    let dir = TempDir::new("sqlite_concurrent_open");
    // A directory that does not exist yet is created.
    let file = Arc::new(dir.0.join("nested").join("shared.sqlite3"));
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let file = Arc::clone(&file);
            tokio::spawn(async move { Tier::builder().path(&*file).build().await })
        })
        .collect();
    let mut tiers = Vec::new();
    for open in opens {
        tiers.push(open.await.unwrap().expect("concurrent open"));
    }
    for (i, t) in tiers.iter().enumerate() {
        assert_eq!(
            t.write(&"k".into(), contract::value(i as i64), None)
                .await
                .map(Written::version)
                .unwrap(),
            i as u64 + 1
        );
    }
}

#[tokio::test]
async fn tables_in_one_file_are_separate_stores() {
    let dir = TempDir::new("sqlite_tables");
    let file = dir.0.join("tables.sqlite3");
    let a = Tier::builder().path(&file).build().await.unwrap();
    let b = Tier::builder()
        .path(&file)
        .table("other_entries")
        .name("other")
        .build()
        .await
        .unwrap();
    assert_eq!(
        a.write(&"k".into(), contract::value(1), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(
        a.write(&"k".into(), contract::value(2), None)
            .await
            .map(Written::version)
            .unwrap(),
        2
    );
    assert!(b.get(&"k".into()).await.unwrap().is_none());
    assert_eq!(
        b.write(&"k".into(), contract::value(3), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(b.name(), "other");
    assert_eq!(a.get(&"k".into()).await.unwrap().unwrap().version, 2);
}

/// A file written before the versions came from the database (migration 0001 only, each key
/// numbered on its own) keeps every key's versions increasing when it is upgraded.
#[tokio::test]
async fn upgrading_a_populated_file_keeps_every_keys_versions_increasing() {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    use sqlx::{ConnectOptions, SqlSafeStr};
    let dir = TempDir::new("sqlite_upgrade");
    let file = dir.0.join("old.sqlite3");
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        let first = include_str!("../migrations/0001_create_entries.sql")
            .replace("{table}", "\"tiercache_entries\"");
        let mut old = Migrator::with_migrations(vec![Migration::new(
            1,
            "create entries".into(),
            MigrationType::Simple,
            AssertSqlSafe(first).into_sql_str(),
            false,
        )]);
        old.dangerous_set_table_name("_tiercache_migrations_tiercache_entries");
        old.run(&mut conn).await.unwrap();
        let json = serde_json::to_string(&*contract::value(1)).unwrap();
        sqlx::query(
            "INSERT INTO tiercache_entries (key, value, version) VALUES ('a', ?1, 7), ('b', ?1, 3)",
        )
        .bind(&json)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let t = Tier::builder().path(&file).build().await.unwrap();
    assert_eq!(t.get(&"a".into()).await.unwrap().unwrap().version, 7);
    let b = t
        .write(&"b".into(), contract::value(3), None)
        .await
        .unwrap()
        .version();
    assert!(b > 7, "b's next version {b} is above every stored version");
    let a = t
        .write(&"a".into(), contract::value(4), None)
        .await
        .unwrap()
        .version();
    assert!(a > b, "{a} after {b}");
}

/// Every writer's change gets its version from the database: a row inserted, updated and
/// deleted with plain SQL is numbered like the crate's own writes and recorded in the change
/// log; an update that leaves the value's text as it is changes nothing.
#[tokio::test]
async fn plain_sql_writers_get_versions_and_log_entries_too() {
    let t = Tier::builder().path(IN_MEMORY).build().await.unwrap();
    let table = t.quoted_table();
    let json = |n| serde_json::to_string(&*contract::value(n)).unwrap();
    let sql = |statement: String, value: String| {
        let pool = t.pool().clone();
        async move {
            sqlx::query(AssertSqlSafe(statement))
                .bind(value)
                .execute(&pool)
                .await
                .unwrap()
        }
    };
    sql(
        format!("INSERT INTO {table} (key, value) VALUES ('k', ?1)"),
        json(1),
    )
    .await;
    let v1 = t.get(&"k".into()).await.unwrap().unwrap().version;
    let mine = t
        .write(&"k".into(), contract::value(2), None)
        .await
        .unwrap()
        .version();
    assert!(mine > v1);
    sql(
        format!("UPDATE {table} SET value = ?1 WHERE key = 'k'"),
        json(2),
    )
    .await;
    assert_eq!(
        t.get(&"k".into()).await.unwrap().unwrap().version,
        mine,
        "the same value again changes nothing"
    );
    sql(
        format!("UPDATE {table} SET value = ?1 WHERE key = 'k'"),
        json(1),
    )
    .await;
    let v3 = t.get(&"k".into()).await.unwrap().unwrap().version;
    assert!(v3 > mine);
    sql(format!("DELETE FROM {table} WHERE key = ?1"), "k".into()).await;
    sql(
        format!("INSERT INTO {table} (key, value) VALUES ('k', ?1)"),
        json(1),
    )
    .await;
    let v5 = t.get(&"k".into()).await.unwrap().unwrap().version;
    assert!(
        v5 > v3 + 1,
        "the delete had a version of its own: {v5} after {v3}"
    );
    let log: Vec<(String, i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT key, version, op FROM {} ORDER BY position",
        t.changes_table()
    )))
    .fetch_all(t.pool())
    .await
    .unwrap();
    let ops: Vec<&str> = log.iter().map(|(_, _, op)| op.as_str()).collect();
    assert_eq!(ops, ["I", "U", "U", "D", "I"], "{log:?}");
    let versions: Vec<i64> = log.iter().map(|(_, v, _)| *v).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(*versions.last().unwrap() as u64, v5);
}

/// Changes made with plain SQL by another connection (another process, the `sqlite3` shell)
/// reach every chain over the file through its feed; a follower that missed entries the log
/// no longer holds empties its caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_connections_changes_reach_every_chain_through_the_feed() {
    use std::time::Duration;
    use tiercache_core::TieredCache;
    use tiercache_memory::MemoryTier;

    let dir = TempDir::new("sqlite_feed");
    let file = dir.0.join("feed.sqlite3");
    let mut chains = Vec::new();
    for _ in 0..2 {
        let tier = Tier::builder().path(&file).build().await.unwrap();
        chains.push(
            TieredCache::builder()
                .tier(MemoryTier::new())
                .source(tier)
                .build()
                .unwrap(),
        );
    }
    let writer = Tier::builder()
        .path(&file)
        .change_retention(Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    let v1 = writer
        .write(&"k".into(), contract::value(1), None)
        .await
        .unwrap()
        .version();
    for chain in &chains {
        assert_eq!(chain.fetch(&"k".into()).await.unwrap().version, v1);
    }
    let json = serde_json::to_string(&*contract::value(2)).unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = ?1 WHERE key = 'k'",
        writer.quoted_table()
    )))
    .bind(json)
    .execute(writer.pool())
    .await
    .unwrap();
    let v2 = writer.get(&"k".into()).await.unwrap().unwrap().version;
    for (i, chain) in chains.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while chain.fetch(&"k".into()).await.unwrap().version != v2 {
            assert!(
                std::time::Instant::now() < deadline,
                "chain {i} never saw v2"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(chain.stats().feed_flushes, 0);
    }
    // A delete with SQL: both chains serve "not found".
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {} WHERE key = 'k'",
        writer.quoted_table()
    )))
    .execute(writer.pool())
    .await
    .unwrap();
    for (i, chain) in chains.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while chain.fetch(&"k".into()).await.unwrap().value.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "chain {i} never saw the delete"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert!(writer.prune_changes().await.unwrap() >= 2);
}

/// A follower whose starting point the log no longer covers (pruned before it read it) says
/// so, and its chain empties its caches; one the log covers gets every change, in order.
#[tokio::test]
async fn a_follower_past_the_pruned_log_reports_everything_lost() {
    use std::time::Duration;
    use tiercache_core::Change;

    let dir = TempDir::new("sqlite_gap");
    let file = dir.0.join("gap.sqlite3");
    let late = Tier::builder().path(&file).build().await.unwrap();
    let covered = Tier::builder().path(&file).build().await.unwrap();
    let writer = Tier::builder()
        .path(&file)
        .change_retention(Duration::from_millis(1))
        .build()
        .await
        .unwrap();
    let mut versions = Vec::new();
    for n in 0..3 {
        let key = format!("k{n}");
        versions.push(
            writer
                .write(&key, contract::value(n), None)
                .await
                .unwrap()
                .version(),
        );
    }
    let mut feed = covered.follow().expect("SQLite has a feed");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        for change in feed.recv().await.unwrap().changes {
            match change {
                Change::Key {
                    version: Some(version),
                    ..
                } => seen.push(version),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(seen, versions, "every change, in commit order");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(writer.prune_changes().await.unwrap(), 3);
    let mut feed = late.follow().expect("SQLite has a feed");
    assert_eq!(feed.recv().await.unwrap().changes, vec![Change::Everything]);
}
