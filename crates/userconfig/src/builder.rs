//! [`UserConfigStorageBuilder`]: which tiers and which database a [`UserConfigStorage`] uses.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{Clock, Source, TieredCache};
use tiercache_memory::MemoryTier;
#[cfg(feature = "postgres")]
use tiercache_postgres::PostgresSource;
use tiercache_redis::{RedisBackplane, RedisTier};
#[cfg(feature = "sqlite")]
use tiercache_sqlite::SqliteSource;

use crate::Key;
use crate::config::UserConfig;
use crate::database::Database;
use crate::error::{Error, Result};
use crate::storage::{
    DEFAULT_MAX_CONFIG_BYTES, DEFAULT_MEMORY_CAPACITY, DEFAULT_MEMORY_TTL, DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_TTL, DEFAULT_SQLITE_PATH, UserConfigStorage,
};

impl UserConfigStorage {
    /// Starts configuring a storage.
    pub fn builder() -> UserConfigStorageBuilder {
        UserConfigStorageBuilder::default()
    }

    /// A storage configured from the environment (the variables are listed at
    /// [`UserConfigStorageBuilder::from_env`]); it logs at info which tiers and database it
    /// chose (never a URL), and warns when it falls back to the embedded SQLite file.
    ///
    /// # Errors
    /// [`Error::Settings`] naming the variable that is malformed; else as
    /// [`UserConfigStorageBuilder::build`].
    pub async fn from_env() -> Result<Self> {
        Self::builder().from_env()?.build().await
    }
}

/// Configures a [`UserConfigStorage`]; see [`UserConfigStorage::builder`].
#[must_use]
pub struct UserConfigStorageBuilder {
    memory_capacity: usize,
    memory_ttl: Duration,
    redis_url: Option<String>,
    redis_tier: Option<Arc<RedisTier<Key, UserConfig>>>,
    redis_ttl: Duration,
    redis_prefix: String,
    #[cfg(feature = "cluster")]
    redis_cluster: Vec<String>,
    backplane: bool,
    follow_changes: bool,
    run_migrations: bool,
    database_url: Option<String>,
    sqlite_path: Option<PathBuf>,
    custom_source: Option<Arc<dyn Source<Key, UserConfig>>>,
    shared_database: Option<Database>,
    max_config_bytes: usize,
    max_watched_users: usize,
    consistency: crate::consistency::Settings,
    max_stale: Option<Duration>,
    background_backfill: bool,
    single_flight: bool,
    clock: Clock,
}

impl fmt::Debug for UserConfigStorageBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may hold passwords: say only whether they are set.
        f.debug_struct("UserConfigStorageBuilder")
            .field("memory_capacity", &self.memory_capacity)
            .field("memory_ttl", &self.memory_ttl)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("redis_cluster_nodes", &self.redis_cluster_len())
            .field("redis_ttl", &self.redis_ttl)
            .field("redis_prefix", &self.redis_prefix)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("sqlite_path", &self.sqlite_path)
            .field("max_config_bytes", &self.max_config_bytes)
            .field("run_migrations", &self.run_migrations)
            .finish_non_exhaustive()
    }
}

impl Default for UserConfigStorageBuilder {
    fn default() -> Self {
        UserConfigStorageBuilder {
            memory_capacity: DEFAULT_MEMORY_CAPACITY,
            memory_ttl: DEFAULT_MEMORY_TTL,
            redis_url: None,
            redis_tier: None,
            redis_ttl: DEFAULT_REDIS_TTL,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            #[cfg(feature = "cluster")]
            redis_cluster: Vec::new(),
            backplane: true,
            follow_changes: true,
            run_migrations: true,
            database_url: None,
            sqlite_path: None,
            custom_source: None,
            shared_database: None,
            max_config_bytes: DEFAULT_MAX_CONFIG_BYTES,
            max_watched_users: crate::DEFAULT_MAX_WATCHED_USERS,
            consistency: crate::consistency::Settings::default(),
            max_stale: Some(tiercache_core::DEFAULT_MAX_STALE),
            background_backfill: true,
            single_flight: true,
            clock: Clock::system(),
        }
    }
}

impl UserConfigStorageBuilder {
    /// Memory tier capacity in entries. Defaults to [`DEFAULT_MEMORY_CAPACITY`].
    pub fn memory_capacity(mut self, capacity: usize) -> Self {
        self.memory_capacity = capacity;
        self
    }

    /// Memory tier TTL. Defaults to [`DEFAULT_MEMORY_TTL`].
    pub fn memory_ttl(mut self, ttl: Duration) -> Self {
        self.memory_ttl = ttl;
        self
    }

    /// Adds a Redis tier at `url` (`redis://`, `rediss://` for TLS, `user:password@` for
    /// AUTH). Without it the chain is memory, then the database.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Adds a Redis tier on a Redis Cluster reached through these seed nodes
    /// (`redis://host:port/` each; the others are discovered), instead of one server
    /// (feature `cluster`). The backplane listens and publishes on one seed node at a time (a
    /// cluster forwards every PUBLISH to all its nodes) and moves to the next when it fails.
    #[cfg(feature = "cluster")]
    pub fn redis_cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redis_cluster = nodes.into_iter().map(Into::into).collect();
        self
    }

    fn redis_cluster_len(&self) -> usize {
        #[cfg(feature = "cluster")]
        return self.redis_cluster.len();
        #[cfg(not(feature = "cluster"))]
        0
    }

    /// Redis TTL. Defaults to [`DEFAULT_REDIS_TTL`].
    pub fn redis_ttl(mut self, ttl: Duration) -> Self {
        self.redis_ttl = ttl;
        self
    }

    /// Redis key prefix; several storages may share one Redis with different prefixes.
    /// Defaults to [`DEFAULT_REDIS_PREFIX`].
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }

    /// Whether the instance follows the database's change feed: every change committed to the
    /// table, by anyone (another instance, `psql`, another service), is applied to its memory
    /// and Redis copies as it commits. Defaults to `true`.
    pub fn follow_changes(mut self, on: bool) -> Self {
        self.follow_changes = on;
        self
    }

    /// Whether a PostgreSQL database's missing migrations are applied on first use (`true`, the
    /// default), or only checked for, failing with a message that names `userconfig migrate`
    /// (`false`: the service's role may read and write the table but not create objects;
    /// docs/operations.md). The embedded SQLite file always migrates itself.
    pub fn run_migrations(mut self, on: bool) -> Self {
        self.run_migrations = on;
        self
    }

    /// Whether instances sharing Redis also tell each other of their updates and
    /// invalidations through Redis pub/sub (on the channel `<redis prefix>invalidations`),
    /// besides the database's change feed. The feed is the authority: it carries every
    /// committed change, by any writer, and keeps working with Redis down. The backplane is a
    /// fast path for changes made through this crate: it carries the new value, so that
    /// another instance's hot copy is replaced in place rather than dropped and read again
    /// (p50 0.16 ms against the feed's 0.87 ms from the write's return, `docs/performance.md`);
    /// it also carries manual invalidations, which the database does not see. Without Redis it
    /// does nothing. Defaults to `true`.
    pub fn backplane(mut self, on: bool) -> Self {
        self.backplane = on;
        self
    }

    /// The database: `postgres://…` / `postgresql://…`, or `sqlite:path`. Defaults to the
    /// embedded SQLite file [`DEFAULT_SQLITE_PATH`].
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// The embedded default's SQLite file (used when no database URL is given).
    pub fn sqlite_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.sqlite_path = Some(path.into());
        self
    }

    /// Uses a Redis tier you built yourself (its own prefix, timeouts, TLS settings) instead of
    /// [`redis_url`](Self::redis_url).
    pub fn redis_tier(mut self, tier: Arc<RedisTier<Key, UserConfig>>) -> Self {
        self.redis_tier = Some(tier);
        self
    }

    #[cfg(feature = "postgres")]
    /// Uses a PostgreSQL tier you built yourself (its own schema, table, pool settings) instead
    /// of [`database_url`](Self::database_url).
    pub fn postgres_source(mut self, tier: Arc<PostgresSource<Key, UserConfig>>) -> Self {
        self.shared_database = Some(Database::Postgres(tier));
        self
    }

    #[cfg(feature = "sqlite")]
    /// Uses an SQLite tier you built yourself instead of [`database_url`](Self::database_url).
    pub fn sqlite_source(mut self, tier: Arc<SqliteSource<Key, UserConfig>>) -> Self {
        self.shared_database = Some(Database::Sqlite(tier));
        self
    }

    /// Uses the same database tier (and connection pool) as `other`: several storages in one
    /// process, standing for several service instances, share one database.
    pub fn share_database(mut self, other: &UserConfigStorage) -> Self {
        self.shared_database = Some(other.database.clone());
        self
    }

    /// A source tier of your own instead of a database (tests, other stores).
    pub fn source(mut self, source: Arc<dyn Source<Key, UserConfig>>) -> Self {
        self.custom_source = Some(source);
        self
    }

    /// Largest configuration accepted, serialized as JSON. Defaults to
    /// [`DEFAULT_MAX_CONFIG_BYTES`].
    pub fn max_config_bytes(mut self, bytes: usize) -> Self {
        self.max_config_bytes = bytes;
        self
    }

    /// Most users watched at once ([`UserConfigStorage::watch`]); a watch of one more is
    /// [`Error::TooManyWatches`]. Defaults to [`DEFAULT_MAX_WATCHED_USERS`](crate::DEFAULT_MAX_WATCHED_USERS).
    pub fn max_watched_users(mut self, users: usize) -> Self {
        self.max_watched_users = users;
        self
    }

    /// The consistency verifier: one read in `one_in` that a cache answers (0: none) is
    /// checked, `grace` after it, against the database's history; a copy replaced more than
    /// `grace` before the read counts as inconsistent (`CacheStats::consistency`). At most
    /// `checks_per_second` checks run (one indexed query each). Defaults to
    /// [`DEFAULT_CONSISTENCY_SAMPLE`](crate::DEFAULT_CONSISTENCY_SAMPLE),
    /// [`DEFAULT_CONSISTENCY_GRACE`](crate::DEFAULT_CONSISTENCY_GRACE) and
    /// [`DEFAULT_CONSISTENCY_CHECKS_PER_SECOND`](crate::DEFAULT_CONSISTENCY_CHECKS_PER_SECOND).
    pub fn consistency_checks(
        mut self,
        one_in: u32,
        grace: Duration,
        checks_per_second: u32,
    ) -> Self {
        self.consistency = crate::consistency::Settings {
            one_in,
            grace,
            checks_per_second,
        };
        self
    }

    /// Oldest stale copy served when the database is down (`None`: never). Defaults to
    /// [`tiercache_core::DEFAULT_MAX_STALE`].
    pub fn max_stale(mut self, age: Option<Duration>) -> Self {
        self.max_stale = age;
        self
    }

    /// Whether a database read back-fills Redis after answering rather than before (the
    /// memory tier is always filled first). Defaults to `true`: a miss does not also wait for
    /// a Redis write.
    pub fn background_backfill(mut self, on: bool) -> Self {
        self.background_backfill = on;
        self
    }

    /// Whether concurrent misses of one user share one database read. Off only to measure what
    /// it saves (`userconfig simulate --compare`). Defaults to `true`.
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// The clock for every tier. Defaults to [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the storage. Connections to Redis and PostgreSQL are made lazily: the storage
    /// builds while they are down.
    ///
    /// # Errors
    /// [`Error::Settings`] for a malformed URL or setting; [`Error::Cache`] if the embedded
    /// SQLite file cannot be opened.
    pub async fn build(self) -> Result<UserConfigStorage> {
        if self.max_config_bytes == 0 {
            return Err(Error::Settings("max_config_bytes must be positive".into()));
        }
        if self.consistency.one_in != 0 && self.consistency.checks_per_second == 0 {
            return Err(Error::Settings(
                "consistency checks need checks_per_second of at least 1 (or one_in 0: off)".into(),
            ));
        }
        if self.max_watched_users == 0 {
            return Err(Error::Settings("max_watched_users must be positive".into()));
        }
        let memory = Arc::new(
            MemoryTier::builder()
                .capacity(self.memory_capacity)
                .ttl(self.memory_ttl)
                .clock(self.clock.clone())
                .build()
                .map_err(settings)?,
        );
        let cluster = self.redis_cluster_len() > 0;
        if cluster && self.redis_url.is_some() {
            return Err(Error::Settings(
                "give either one Redis server or a Redis Cluster's nodes, not both".into(),
            ));
        }
        let redis = match (self.redis_tier, &self.redis_url) {
            (Some(tier), _) => Some(tier),
            (None, url) if url.is_some() || cluster => {
                let mut tier = RedisTier::builder()
                    .prefix(self.redis_prefix.clone())
                    .ttl(self.redis_ttl)
                    .clock(self.clock.clone());
                if let Some(url) = url {
                    tier = tier.url(url.clone());
                }
                #[cfg(feature = "cluster")]
                if cluster {
                    tier = tier.cluster(self.redis_cluster.clone());
                }
                Some(Arc::new(tier.build().map_err(settings)?))
            }
            (None, _) => None,
        };
        let database = match (self.shared_database, self.custom_source) {
            (Some(database), _) => database,
            (None, Some(source)) => Database::Custom(source),
            (None, None) => {
                open_database(
                    self.database_url.as_deref(),
                    self.sqlite_path,
                    self.run_migrations,
                )
                .await?
            }
        };
        tracing::info!(
            memory_capacity = self.memory_capacity,
            memory_ttl_secs = self.memory_ttl.as_secs_f64(),
            redis = match (&redis, cluster) {
                (None, _) => "none",
                (Some(_), true) => "cluster",
                (Some(_), false) => "server",
            },
            redis_ttl_secs = redis.as_ref().map(|_| self.redis_ttl.as_secs_f64()),
            backplane = self.backplane && redis.is_some(),
            follow_changes = self.follow_changes,
            database = database.backend(),
            "userconfig storage: memory, then {}the {} database",
            if redis.is_some() { "Redis, then " } else { "" },
            database.backend(),
        );
        let backplane = match (&redis, self.backplane) {
            (Some(redis), true) => Some(
                RedisBackplane::with_clients(
                    redis.backplane_clients(),
                    format!("{}invalidations", redis.prefix()),
                )
                .map_err(settings)?,
            ),
            _ => None,
        };
        let mut chain = TieredCache::builder()
            .shared_tier(memory.clone(), None)
            .clock(self.clock)
            .max_stale(self.max_stale)
            .background_backfill(self.background_backfill)
            .single_flight(self.single_flight)
            // A missed invalidation may leave an old copy in Redis for its whole TTL.
            .floor_ttl(self.redis_ttl.max(self.memory_ttl))
            // The database's own limits may let a write commit after the chain's 2 s.
            .write_settle(database.write_settle())
            .follow_changes(self.follow_changes);
        if let Some(redis) = &redis {
            // A read pays at most the Redis tier's own time limit (50 ms by default), however
            // Redis fails (slow, partitioned, reconnecting).
            chain = chain.shared_tier(redis.clone(), Some(redis.timeout()));
        }
        if let Some(backplane) = &backplane {
            chain = chain.backplane(Arc::new(backplane.clone()));
        }
        let cache = chain
            .shared_source(
                database.source(),
                Some(tiercache_core::DEFAULT_SOURCE_TIMEOUT),
            )
            .build()
            .map_err(settings)?;
        if let Some(backplane) = &backplane {
            backplane.attach(&cache);
        }
        if let Some(redis) = &redis {
            // Connect now rather than on the first requests, and serve once the backplane's
            // first subscription is up (or failed): the memory tier filled before it would be
            // flushed when it comes up. Bounded by a connection attempt.
            let within = redis.connect_timeout();
            let subscribed = async {
                if let Some(backplane) = &backplane {
                    backplane.first_attempt(within).await;
                }
            };
            tokio::join!(redis.connect_within(within), subscribed);
        }
        Ok(UserConfigStorage {
            cache,
            memory,
            redis,
            backplane,
            database,
            max_config_bytes: self.max_config_bytes,
            watches: crate::watch::Watches::new(self.max_watched_users),
            verifier: crate::consistency::Verifier::new(self.consistency),
            change_log: crate::changes::ChangeLog::new(crate::DEFAULT_CHANGE_LOG_ENTRIES),
            author: None,
        })
    }
}

fn settings(error: tiercache_core::Error) -> Error {
    match error {
        tiercache_core::Error::Config(message) => Error::Settings(message),
        other => Error::Cache(other),
    }
}

/// The database a URL names, or the embedded SQLite file without one.
#[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
async fn open_database(
    url: Option<&str>,
    sqlite_path: Option<PathBuf>,
    run_migrations: bool,
) -> Result<Database> {
    match url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            #[cfg(feature = "postgres")]
            return Ok(Database::Postgres(Arc::new(
                PostgresSource::builder()
                    .url(url.to_owned())
                    .run_migrations(run_migrations)
                    .build()
                    .map_err(settings)?,
            )));
            #[cfg(not(feature = "postgres"))]
            Err(Error::Settings(
                "a postgres:// database URL needs userconfig's feature `postgres`".into(),
            ))
        }
        Some(url) if url.starts_with("sqlite:") => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            open_sqlite(PathBuf::from(path)).await
        }
        Some(_) => Err(Error::Settings(
            "DATABASE_URL must start with postgres://, postgresql:// or sqlite:".into(),
        )),
        None => {
            let path = sqlite_path.unwrap_or_else(|| PathBuf::from(DEFAULT_SQLITE_PATH));
            let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
            tracing::warn!(
                path = %shown.display(),
                "no database URL: using the embedded SQLite file, which only this machine's \
                 processes share (set DATABASE_URL for PostgreSQL)"
            );
            open_sqlite(path).await
        }
    }
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(path: PathBuf) -> Result<Database> {
    Ok(Database::Sqlite(Arc::new(
        SqliteSource::builder().path(path).build().await?,
    )))
}

#[cfg(not(feature = "sqlite"))]
#[allow(clippy::unused_async)]
async fn open_sqlite(_path: PathBuf) -> Result<Database> {
    Err(Error::Settings(
        "no database URL given, and the embedded SQLite default needs userconfig's feature \
         `sqlite` (set DATABASE_URL=postgres://…)"
            .into(),
    ))
}
