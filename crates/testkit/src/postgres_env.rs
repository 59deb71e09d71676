//! Tests against a real PostgreSQL: a pool for `DATABASE_URL` and a schema per test, so that
//! tests run in parallel without seeing each other's rows.
//!
//! ```no_run
//! # async fn demo() {
//! use tiercache_testkit::postgres_env;
//!
//! let pool = postgres_env::postgres_pool().await; // panics, naming DATABASE_URL, if unreachable
//! let schema = postgres_env::fresh_schema(&pool).await;
//! // ... give `schema` to the tier under test ...
//! postgres_env::drop_schema(&pool, &schema).await;
//! # }
//! ```

use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::env;

/// A small pool for [`env::database_url`], after a successful `SELECT 1`.
///
/// # Panics
/// If PostgreSQL cannot be reached, with a message naming `DATABASE_URL` and the command that
/// starts the local server.
pub async fn postgres_pool() -> PgPool {
    let url = env::database_url();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{}",
            env::unreachable("PostgreSQL", env::DATABASE_URL_VAR, env::POSTGRES_START, e)
        )
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&url)
        .unwrap_or_else(|e| fail(&e));
    match sqlx::query("SELECT 1").execute(&pool).await {
        Ok(_) => pool,
        Err(e) => fail(&e),
    }
}

/// Creates a schema no other test uses ([`env::unique_name`]) and returns its name.
pub async fn fresh_schema(pool: &PgPool) -> String {
    let name = env::unique_name("schema");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{name}\"")))
        .execute(pool)
        .await
        .expect("CREATE SCHEMA");
    name
}

/// Drops a schema made by [`fresh_schema`], with everything in it. The chains of a test may
/// still be following the schema's change log (a catch-up read, a prune): a drop that loses a
/// deadlock to one of them is tried again.
pub async fn drop_schema(pool: &PgPool, name: &str) {
    assert!(
        name.starts_with("tc_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "refusing to drop schema {name:?}: not one of fresh_schema's"
    );
    let mut attempts = 0;
    loop {
        let dropped = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
        )))
        .execute(pool)
        .await;
        match dropped {
            Ok(_) => return,
            Err(_) if attempts < 5 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(error) => panic!("DROP SCHEMA {name}: {error}"),
        }
    }
}
