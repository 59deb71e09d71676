//! The SQLite tier's own cases (the shared contract is in `contract.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::AssertSqlSafe;
use tiercache_core::{Source, Written};
use tiercache_sqlite::{IN_MEMORY, SqliteTier};
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::env;

type Tier = SqliteTier<String, ContractValue>;

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
