//! The PostgreSQL tier against the real local server (`DATABASE_URL`), each test in its own
//! schema.

use std::sync::Arc;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use tiercache_core::{CacheTier, Error};
use tiercache_postgres::PostgresTier;
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::{env, postgres_env};

type Tier = PostgresTier<String, ContractValue>;

fn tier(schema: &str) -> Tier {
    PostgresTier::builder()
        .url(env::database_url())
        .schema(schema)
        .build()
        .unwrap()
}

#[tokio::test]
async fn the_contract_holds() {
    let pool = postgres_env::postgres_pool().await;
    let schemas = Arc::new(std::sync::Mutex::new(Vec::new()));
    contract::run_all(|| {
        let (pool, schemas) = (pool.clone(), schemas.clone());
        async move {
            let schema = postgres_env::fresh_schema(&pool).await;
            schemas.lock().unwrap().push(schema.clone());
            Arc::new(tier(&schema))
        }
    })
    .await;
    let schemas = std::mem::take(&mut *schemas.lock().unwrap());
    for s in schemas {
        postgres_env::drop_schema(&pool, &s).await;
    }
}

#[tokio::test]
async fn a_row_that_does_not_decode_is_an_error_naming_the_key() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    t.write(&"alice".into(), contract::value(1)).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = '{{\"name\": 5}}' WHERE key = 'alice'",
        t.qualified_table()
    )))
    .execute(&pool)
    .await
    .unwrap();
    let err = t.get(&"alice".into()).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("`alice`"), "{source}");
    let err = t.get_many(&["alice".into()]).await.unwrap_err();
    assert!(err.is_corrupt());
    assert_eq!(t.stats().corrupt, 2);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_server_that_refuses_connections_is_a_transient_unavailable_error() {
    let t: Tier = PostgresTier::builder()
        .url("postgres://postgres@127.0.0.1:1/test")
        .build()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), t.get(&"a".into()))
        .await
        .expect("a down database must not hang a call")
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_transient());
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        text.contains("refused") || text.contains("unreachable"),
        "{text}"
    );
    // Right after, calls fail at once rather than each waiting out the pool's time limit.
    let err = t.write(&"a".into(), contract::value(1)).await.unwrap_err();
    assert!(err.is_transient());
    assert!(t.stats().errors >= 2);
}

#[tokio::test]
async fn migrations_are_idempotent_and_tables_are_isolated() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let a = tier(&schema);
    let b = tier(&schema);
    a.migrate().await.unwrap();
    b.migrate().await.unwrap();
    a.write(&"k".into(), contract::value(1)).await.unwrap();
    assert_eq!(b.get(&"k".into()).await.unwrap().unwrap().version, 1);
    // Another table in the same schema is another store.
    let other: Tier = PostgresTier::builder()
        .url(env::database_url())
        .schema(&schema)
        .table("other_entries")
        .build()
        .unwrap();
    assert!(other.get(&"k".into()).await.unwrap().is_none());
    assert_eq!(
        other.write(&"k".into(), contract::value(2)).await.unwrap(),
        1
    );
    assert_eq!(a.get(&"k".into()).await.unwrap().unwrap().version, 1);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_slow_statement_is_a_timeout() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t: Tier = PostgresTier::builder()
        .url(env::database_url())
        .schema(&schema)
        .statement_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    t.write(&"k".into(), contract::value(1)).await.unwrap();
    // Hold the row's lock so that the next write waits past the statement time limit.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE key = 'k' FOR UPDATE",
        t.qualified_table()
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let err = t.write(&"k".into(), contract::value(2)).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    tx.rollback().await.unwrap();
    // The pool is not poisoned by the cancelled statement.
    assert_eq!(t.write(&"k".into(), contract::value(3)).await.unwrap(), 2);
    postgres_env::drop_schema(&pool, &schema).await;
}
