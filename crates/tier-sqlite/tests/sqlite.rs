//! The SQLite tier: the shared source contract on files and in memory, plus its own cases.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sqlx::AssertSqlSafe;
use tiercache_core::CacheTier;
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
async fn the_contract_holds_on_files() {
    let dir = TempDir::new("sqlite_contract");
    let n = Arc::new(Mutex::new(0));
    contract::run_all(|| {
        let (path, n) = (dir.0.clone(), n.clone());
        async move {
            let file = {
                let mut n = n.lock().unwrap();
                *n += 1;
                path.join(format!("db{n}.sqlite3"))
            };
            Arc::new(Tier::builder().path(file).build().await.unwrap())
        }
    })
    .await;
}

#[tokio::test]
async fn the_contract_holds_in_memory() {
    contract::run_all(|| async {
        Arc::new(Tier::builder().path(IN_MEMORY).build().await.unwrap())
    })
    .await;
}

#[tokio::test]
async fn a_row_that_does_not_decode_is_an_error_naming_the_key() {
    let t = Tier::builder().path(IN_MEMORY).build().await.unwrap();
    t.write(&"alice".into(), contract::value(1)).await.unwrap();
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
    assert!(source.contains("`alice`"), "{source}");
}

#[tokio::test]
async fn data_survives_reopening_and_pools_share_a_file() {
    let dir = TempDir::new("sqlite_reopen");
    let file = dir.0.join("data.sqlite3");
    let a = Tier::builder().path(&file).build().await.unwrap();
    let b = Tier::builder().path(&file).build().await.unwrap();
    a.write(&"k".into(), contract::value(1)).await.unwrap();
    assert_eq!(b.write(&"k".into(), contract::value(2)).await.unwrap(), 2);
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
        other.write(&"k".into(), contract::value(1)).await.unwrap(),
        1
    );
}
