//! The real servers of one test (`REDIS_URL`, `DATABASE_URL`): its own Redis prefix and its
//! own PostgreSQL schema, so that tests run in parallel; and service instances over them.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::CacheTier;
use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{env, postgres_env, redis_env};
use userconfig::{UserConfig, UserConfigStorage};

pub struct Servers {
    pub redis: Arc<RedisTier<String, UserConfig>>,
    pub postgres: Arc<PostgresSource<String, UserConfig>>,
    pub pool: sqlx::PgPool,
    pub schema: String,
}

impl Servers {
    pub async fn new(tag: &str) -> Self {
        Self::with_redis_ttl(tag, Duration::from_secs(1800)).await
    }

    pub async fn with_redis_ttl(tag: &str, ttl: Duration) -> Self {
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let redis = Arc::new(
            RedisTier::builder()
                .url(redis_env::redis_url().await)
                .prefix(redis_env::unique_prefix(tag))
                .ttl(ttl)
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
        );
        let postgres = Arc::new(
            PostgresSource::builder()
                .url(env::database_url())
                .schema(schema.clone())
                .build()
                .unwrap(),
        );
        Servers {
            redis,
            postgres,
            pool,
            schema,
        }
    }

    /// A service instance: its own memory tier, the shared Redis and database.
    pub async fn instance(&self) -> UserConfigStorage {
        UserConfigStorage::builder()
            .redis_tier(self.redis.clone())
            .postgres_source(self.postgres.clone())
            .backplane(true)
            .build()
            .await
            .unwrap()
    }

    /// `n` instances.
    pub async fn instances(&self, n: usize) -> Vec<UserConfigStorage> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.instance().await);
        }
        out
    }

    /// Runs one statement on the test's pool.
    pub async fn sql(&self, statement: String) {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// The entries' table, schema-qualified and quoted.
    pub fn table(&self) -> String {
        format!("\"{}\".\"tiercache_entries\"", self.schema)
    }

    /// The database's version of `user` (0: none stored).
    pub async fn db_version(&self, user: &str) -> u64 {
        let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM {} WHERE key = $1",
            self.table()
        )))
        .bind(user)
        .fetch_optional(&self.pool)
        .await
        .unwrap();
        v.map_or(0, |v| v as u64)
    }

    pub async fn cleanup(self) {
        let _ = self.redis.clear().await;
        postgres_env::drop_schema(&self.pool, &self.schema).await;
    }
}

/// `user`'s defaults with the theme `theme`.
pub fn themed(user: &str, theme: &str) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = theme.into();
    c
}

/// The `host:port` of a URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let host = rest.rsplit('@').next().unwrap();
    host.split('/').next().unwrap().to_string()
}
