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

    pub async fn cleanup(self) {
        let _ = self.redis.clear().await;
        postgres_env::drop_schema(&self.pool, &self.schema).await;
    }
}
