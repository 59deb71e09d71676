//! The SQLite tier of tiercache: the authoritative source on an embedded database file, so the
//! whole system runs with no server at all (the embedded default).
//!
//! It keeps the PostgreSQL tier's contract and versioning: one table (default
//! `tiercache_entries`: `key`, `value` as JSON text, `version`, `updated_at`) created by embedded
//! migrations, reads by primary key, `get_many` in one query (`json_each`), and writes by one
//! statement that upserts and increments the version atomically and returns it. The file is
//! opened in WAL mode with a busy timeout, so several pools in one process (several simulated
//! service instances) can share it. A row that does not decode is [`Error::Corrupt`] naming the
//! key.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use tiercache_core::CacheTier;
//! use tiercache_sqlite::SqliteTier;
//!
//! let db = SqliteTier::<String, String>::builder().path(":memory:").build().await?;
//! assert_eq!(db.write(&"alice".into(), Arc::new("dark".into())).await?, 1);
//! assert_eq!(db.get(&"alice".into()).await?.unwrap().version, 1);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::migrate::{Migration, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr};
use tiercache_core::{CacheTier, Counter, Entry, Error, Result, StorageKey, TierStats, Version};

/// Default table.
pub const DEFAULT_TABLE: &str = "tiercache_entries";
/// Default pool size.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;
/// Default time a statement waits for a lock held by another connection.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default tier name.
pub const DEFAULT_NAME: &str = "sqlite";
/// The path that keeps the database in memory (one connection, gone when the tier is).
pub const IN_MEMORY: &str = ":memory:";

static EMBEDDED: Migrator = sqlx::migrate!("./migrations");

/// The SQLite tier. See the [crate docs](crate).
pub struct SqliteTier<K, V> {
    pool: SqlitePool,
    path: PathBuf,
    table: String,
    sql: Statements,
    name: String,
    stats: Stats,
    _types: PhantomData<fn() -> (K, V)>,
}

struct Statements {
    get: String,
    get_many: String,
    write: String,
}

#[derive(Default)]
struct Stats {
    hits: Counter,
    misses: Counter,
    errors: Counter,
    corrupt: Counter,
}

impl<K, V> fmt::Debug for SqliteTier<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTier")
            .field("path", &self.path)
            .field("table", &self.table)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A stored value that does not decode, naming its key.
#[derive(Debug, thiserror::Error)]
#[error("stored value for key `{key}` does not decode: {reason}")]
pub struct Undecodable {
    /// The key.
    pub key: String,
    /// The decoder's message.
    pub reason: String,
}

/// Maps a sqlx error onto the core's: I/O, a busy pool and a locked database are transient.
fn map_error(tier: &str, error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Error::unavailable(tier, error)
        }
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        sqlx::Error::Database(db)
            if db
                .code()
                .and_then(|c| c.parse::<u32>().ok())
                .is_some_and(|c| matches!(c & 0xFF, 5 | 6)) =>
        {
            Error::unavailable(tier, error)
        }
        _ => Error::backend(tier, error),
    }
}

fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 40
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> SqliteTier<K, V> {
    /// Starts configuring a tier.
    pub fn builder() -> SqliteTierBuilder<K, V> {
        SqliteTierBuilder::default()
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The table, quoted, as used in statements.
    #[must_use]
    pub fn quoted_table(&self) -> String {
        format!("\"{}\"", self.table)
    }

    /// The database file (or [`IN_MEMORY`]).
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    async fn migrate(&self) -> Result<()> {
        let table = self.quoted_table();
        let migrations: Vec<Migration> = EMBEDDED
            .iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    m.description.clone(),
                    m.migration_type,
                    AssertSqlSafe(m.sql.as_str().replace("{table}", &table)).into_sql_str(),
                    m.no_tx,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator
            .dangerous_set_table_name(Cow::Owned(format!("_tiercache_migrations_{}", self.table)));
        migrator.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => map_error(&self.name, inner),
            other => Error::backend(&self.name, other),
        })
    }

    fn failed(&self, error: sqlx::Error) -> Error {
        self.stats.errors.incr();
        let error = map_error(&self.name, error);
        tracing::debug!(tier = %self.name, %error, "database call failed");
        error
    }

    fn decode(&self, key: &str, json: &str, version: i64) -> Result<Entry<V>> {
        let value: V = serde_json::from_str(json).map_err(|e| {
            self.stats.corrupt.incr();
            Error::corrupt(
                &self.name,
                Undecodable {
                    key: key.to_owned(),
                    // Where and why, never the data (it may be a user's configuration).
                    reason: format!(
                        "{:?} error at line {} column {}",
                        e.classify(),
                        e.line(),
                        e.column()
                    ),
                },
            )
        })?;
        Ok(Entry::new(
            Arc::new(value),
            u64::try_from(version).unwrap_or(0),
        ))
    }
}

#[async_trait]
impl<K, V> CacheTier<K, V> for SqliteTier<K, V>
where
    K: StorageKey,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let key = key.storage_key();
        let row = sqlx::query(AssertSqlSafe(self.sql.get.as_str()))
            .bind(key.as_ref())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        match row {
            Some(row) => {
                self.stats.hits.incr();
                let json: String = row.try_get(0).map_err(|e| self.failed(e))?;
                let version: i64 = row.try_get(1).map_err(|e| self.failed(e))?;
                self.decode(&key, &json, version).map(Some)
            }
            None => {
                self.stats.misses.incr();
                Ok(None)
            }
        }
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let texts: Vec<String> = keys.iter().map(|k| k.storage_key().into_owned()).collect();
        let list = serde_json::to_string(&texts).expect("strings serialize");
        let rows = sqlx::query(AssertSqlSafe(self.sql.get_many.as_str()))
            .bind(list)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        let mut found: HashMap<String, (String, i64)> = HashMap::with_capacity(rows.len());
        for row in rows {
            let key: String = row.try_get(0).map_err(|e| self.failed(e))?;
            let json: String = row.try_get(1).map_err(|e| self.failed(e))?;
            let version: i64 = row.try_get(2).map_err(|e| self.failed(e))?;
            found.insert(key, (json, version));
        }
        texts
            .iter()
            .map(|key| match found.get(key) {
                Some((json, version)) => {
                    self.stats.hits.incr();
                    self.decode(key, json, *version).map(Some)
                }
                None => {
                    self.stats.misses.incr();
                    Ok(None)
                }
            })
            .collect()
    }

    async fn set(&self, _key: &K, _entry: Entry<V>) -> Result<bool> {
        Err(Error::unsupported(&self.name, "set"))
    }

    async fn invalidate(&self, _key: &K, _version: Option<Version>) -> Result<()> {
        Err(Error::unsupported(&self.name, "invalidate"))
    }

    async fn clear(&self) -> Result<()> {
        Err(Error::unsupported(&self.name, "clear"))
    }

    async fn write(&self, key: &K, value: Arc<V>) -> Result<Version> {
        let json = serde_json::to_string(&*value)
            .map_err(|e| Error::InvalidInput(format!("value does not serialize: {e}")))?;
        let version: i64 = sqlx::query_scalar(AssertSqlSafe(self.sql.write.as_str()))
            .bind(key.storage_key().as_ref())
            .bind(json)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    fn stats(&self) -> TierStats {
        let s = &self.stats;
        TierStats::new(self.name.clone(), s.hits.get(), s.misses.get())
            .with_errors(s.errors.get())
            .with_housekeeping(0, s.corrupt.get(), 0)
    }
}

/// Configures a [`SqliteTier`]; see [`SqliteTier::builder`].
#[must_use]
pub struct SqliteTierBuilder<K, V> {
    path: PathBuf,
    table: String,
    max_connections: u32,
    busy_timeout: Duration,
    name: String,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Default for SqliteTierBuilder<K, V> {
    fn default() -> Self {
        SqliteTierBuilder {
            path: PathBuf::from("tiercache.sqlite3"),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            name: DEFAULT_NAME.to_owned(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for SqliteTierBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTierBuilder")
            .field("path", &self.path)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static>
    SqliteTierBuilder<K, V>
{
    /// The database file, created if missing, or [`IN_MEMORY`]. Defaults to
    /// `tiercache.sqlite3` in the working directory.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// The table. Defaults to [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Pool size (1 for [`IN_MEMORY`], whatever is set). Defaults to
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long a statement waits for another connection's lock. Defaults to
    /// [`DEFAULT_BUSY_TIMEOUT`].
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The tier's name in stats and errors. Defaults to [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Opens (or creates) the database and runs the migrations.
    ///
    /// # Errors
    /// [`Error::Config`] for a table name outside `[a-z_][a-z0-9_]*` (at most 40 characters)
    /// or a pool of zero connections; [`Error::Unavailable`] / [`Error::Backend`] if the file
    /// cannot be opened or migrated.
    pub async fn build(self) -> Result<SqliteTier<K, V>> {
        if !valid_identifier(&self.table) {
            return Err(Error::Config(format!(
                "table `{}` is not a plain identifier ([a-z_][a-z0-9_]*, at most 40 characters)",
                self.table
            )));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        let in_memory = self.path.as_os_str() == IN_MEMORY;
        let options = SqliteConnectOptions::new()
            .busy_timeout(self.busy_timeout)
            .foreign_keys(false);
        let (options, pool_options) = if in_memory {
            (
                options.in_memory(true),
                // One connection that never closes: the database lives as long as it does.
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None),
            )
        } else {
            (
                options
                    .filename(&self.path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal),
                SqlitePoolOptions::new().max_connections(self.max_connections),
            )
        };
        let pool = pool_options
            .connect_with(options)
            .await
            .map_err(|e| map_error(&self.name, e))?;
        let t = format!("\"{}\"", self.table);
        let tier = SqliteTier {
            pool,
            path: self.path,
            sql: Statements {
                get: format!("SELECT value, version FROM {t} WHERE key = ?1"),
                get_many: format!(
                    "SELECT key, value, version FROM {t} \
                     WHERE key IN (SELECT value FROM json_each(?1))"
                ),
                write: format!(
                    "INSERT INTO {t} (key, value, version) VALUES (?1, ?2, 1) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                     version = {t}.version + 1, \
                     updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
                     RETURNING version"
                ),
            },
            table: self.table,
            name: self.name,
            stats: Stats::default(),
            _types: PhantomData,
        };
        tier.migrate().await?;
        Ok(tier)
    }
}
