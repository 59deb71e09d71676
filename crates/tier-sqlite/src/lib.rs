//! The SQLite tier of tiercache: the authoritative source on an embedded database file, so the
//! whole system runs with no server at all (the embedded default).
//!
//! It keeps the PostgreSQL tier's contract and versioning: one table (default
//! `tiercache_entries`: `key`, `value` as JSON text, `version`, `updated_at`) created by embedded
//! migrations, reads by primary key, `get_many` in one query (`json_each`). Versions come from
//! the database, for every writer (this crate, the `sqlite3` shell, another process): triggers
//! give each committed insert, update and delete the next number of one counter
//! (`<table>_versions`), so a key's versions never repeat, even across a delete and a
//! re-creation, and record the change in the change log (`<table>_changes`, in commit order,
//! SQLite having one writer at a time). An update that leaves the value's text as it is changes
//! nothing. This crate's writes and deletes run in one immediate transaction that checks the
//! expected version (compare-and-set) and skips a write of the stored value. The file is
//! opened in WAL mode with a busy timeout, so several pools in one process (several simulated
//! service instances) can share it, and several of them may open a new file at once (a
//! migrator that loses the race to apply a migration runs again and finds it applied). A row
//! that does not decode is [`Error::Corrupt`] naming the key.
//!
//! * [`SqliteSourceBuilder::build`] is `async`: it opens (or creates, with its directory) the file
//!   and runs the migrations before it returns.
//! * [`IN_MEMORY`] (`":memory:"`) keeps the database in one connection that is never closed:
//!   it lives as long as the tier, and statements run one at a time.
//! * Errors: a lock still held after the busy timeout is a transient [`Error::Timeout`]; I/O
//!   failures and a pool that stays busy are a transient [`Error::Unavailable`]; anything else
//!   is [`Error::Backend`]. Messages never contain a value.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use tiercache_core::{Source, Written};
//! use tiercache_sqlite::SqliteSource;
//!
//! let db = SqliteSource::<String, String>::builder().path(":memory:").build().await?;
//! let written = db.write(&"alice".into(), Arc::new("dark".into()), None).await?;
//! assert_eq!(written, Written::Changed(1));
//! assert_eq!(db.get(&"alice".into()).await?.unwrap().version, 1);
//! // The same value again commits nothing; a stale expected version is a conflict.
//! let again = db.write(&"alice".into(), Arc::new("dark".into()), None).await?;
//! assert_eq!(again, Written::Unchanged(1));
//! assert!(db.write(&"alice".into(), Arc::new("light".into()), Some(0)).await.is_err());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod feed;

pub use feed::{DEFAULT_CHANGE_RETENTION, DEFAULT_FEED_POLL, DEFAULT_HISTORY_RETENTION};

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::migrate::MigrateError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};
use tiercache_core::{
    ChangeFeed, Entry, Error, Result, Revision, Source, StorageKey, TierStats, Version, Written,
};
use tiercache_sql::{RowStats, valid_identifier};

/// Default database file (relative to the working directory).
pub const DEFAULT_PATH: &str = "tiercache.sqlite3";
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

/// How many times [`SqliteSource::migrate`] runs the migrator when another one applied the same
/// migration first.
const MIGRATION_ATTEMPTS: u32 = 3;

/// The migrations, in order (`include_str!`: no proc-macro build of sqlx's drivers).
const EMBEDDED: &[tiercache_sql::Embedded] = &tiercache_sql::embedded([
    (
        "create entries",
        include_str!("../migrations/0001_create_entries.sql"),
    ),
    (
        "versions and changes",
        include_str!("../migrations/0002_versions_and_changes.sql"),
    ),
    ("history", include_str!("../migrations/0003_history.sql")),
]);

/// The SQLite tier. See the [crate docs](crate).
pub struct SqliteSource<K, V> {
    pool: SqlitePool,
    path: PathBuf,
    /// The change log's last position when the tier was opened: where its followers start.
    start: i64,
    /// Wakes this tier's followers after each of its commits.
    wake: Arc<tokio::sync::Notify>,
    change_retention: Duration,
    feed_poll: Duration,
    table: String,
    sql: Statements,
    name: String,
    busy_timeout: Duration,
    stats: RowStats,
    prune_sql: Arc<feed::PruneSql>,
    /// The followers' prunes that failed.
    prune_failures: Arc<tiercache_core::Counter>,
    _types: PhantomData<fn() -> (K, V)>,
}

struct Statements {
    get: String,
    get_many: String,
    write: String,
    version: String,
    delete: String,
    last_version: String,
    history: String,
    revision: String,
    purge_history: String,
}

impl<K, V> fmt::Debug for SqliteSource<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteSource")
            .field("path", &self.path)
            .field("table", &self.table)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

pub use tiercache_sql::Undecodable;

/// Why a change did not happen.
enum Changed {
    Conflict { expected: Version, current: Version },
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Changed {
    fn from(error: sqlx::Error) -> Self {
        Changed::Sql(error)
    }
}

/// `SQLITE_BUSY`: another connection held the lock for the whole busy timeout.
const SQLITE_BUSY: u32 = 5;
/// `SQLITE_LOCKED`: a conflict within this connection's shared cache.
const SQLITE_LOCKED: u32 = 6;

/// Whether an SQLite result code is `SQLITE_BUSY` or `SQLITE_LOCKED`, extended codes included.
fn busy(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<u32>().ok())
        .is_some_and(|c| matches!(c & 0xFF, SQLITE_BUSY | SQLITE_LOCKED))
}

/// Maps a sqlx error onto the core's: a lock still held after the busy timeout is a timeout;
/// I/O, a busy pool and other lock conflicts are transient; the rest is a backend error.
fn map_error(tier: &str, busy_timeout: Duration, error: sqlx::Error) -> Error {
    let code = match &error {
        sqlx::Error::Database(db) => db.code().and_then(|c| c.parse::<u32>().ok()),
        _ => None,
    };
    match (&error, code) {
        (_, Some(SQLITE_BUSY)) => Error::Timeout {
            tier: tier.to_owned(),
            after: busy_timeout,
        },
        // The extended codes of BUSY and LOCKED (BUSY_SNAPSHOT, LOCKED_SHAREDCACHE, ...).
        (_, Some(c)) if matches!(c & 0xFF, SQLITE_BUSY | SQLITE_LOCKED) => {
            Error::unavailable(tier, error)
        }
        (
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed,
            _,
        ) => Error::unavailable(tier, error),
        _ => Error::backend(tier, error),
    }
}

/// A history row's time (ISO text) as microseconds since the Unix epoch.
const MICROS: &str = "CAST((julianday(at) - 2440587.5) * 86400000000.0 AS INTEGER)";

/// `sql` with the names of `table`'s objects filled in: `{table}` and `{table}_<suffix>` for
/// `{suffix}` (the version counter, the change log, the triggers), each quoted.
fn fill(table: &str, sql: &str) -> String {
    let mut sql = sql.replace("{table}", &format!("\"{table}\""));
    for suffix in [
        "rebuilt",
        "versions",
        "changes",
        "changes_at",
        "history_at",
        "history",
        "feed",
        "inserted",
        "updated",
        "deleted",
    ] {
        sql = sql.replace(&format!("{{{suffix}}}"), &format!("\"{table}_{suffix}\""));
    }
    sql
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> SqliteSource<K, V> {
    /// Starts configuring a tier.
    pub fn builder() -> SqliteSourceBuilder<K, V> {
        SqliteSourceBuilder::default()
    }

    /// The longest a write can still take to commit after it was started: its busy time limit
    /// (waiting for another connection's lock). A chain over this tier waits this long (plus a
    /// margin) before it settles a write whose outcome it could not learn
    /// (`TieredCacheBuilder::write_settle`).
    #[must_use]
    pub fn longest_write(&self) -> Duration {
        self.busy_timeout
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

    /// The change log table, quoted: one row per committed change of the table, by any
    /// writer (`position`, `key`, `version`, `op`, `at`), in commit order.
    #[must_use]
    pub fn changes_table(&self) -> String {
        format!("\"{}_changes\"", self.table)
    }

    /// Deletes the change log's entries older than the retention
    /// ([`change_retention`](SqliteSourceBuilder::change_retention)) and records what it removed,
    /// so that a follower that missed them empties its caches instead. Followers do it by
    /// themselves once a minute. Returns the entries deleted.
    ///
    /// # Errors
    /// [`Error::Timeout`] if another connection holds the write lock past the busy timeout.
    pub async fn prune_changes(&self) -> Result<u64> {
        feed::prune(&self.pool, &self.prune_sql, self.change_retention)
            .await
            .map_err(|e| self.failed(e))
    }

    /// The database file (or [`IN_MEMORY`]).
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Creates the table if it is missing.
    ///
    /// sqlx's migration lock does nothing on SQLite, so tiers opening one new file at the same
    /// time may both try to apply a migration. In one process they take turns (`build` holds
    /// a lock of the process's own). Across processes, each migration and its bookkeeping row commit
    /// together, so the loser's bookkeeping insert fails on the primary key (or its upgrade
    /// to a writer finds the file changed) and its transaction rolls back; it then runs again
    /// and finds the migration applied.
    async fn migrate(&self) -> Result<()> {
        let mut migrator = tiercache_sql::templated(EMBEDDED, |sql| fill(&self.table, sql));
        migrator
            .dangerous_set_table_name(Cow::Owned(format!("_tiercache_migrations_{}", self.table)));
        let mut attempt = 1;
        loop {
            match migrator.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(MigrateError::Execute(sqlx::Error::Database(db)))
                    if (db.is_unique_violation() || busy(db.code().as_deref()))
                        && attempt < MIGRATION_ATTEMPTS =>
                {
                    tracing::debug!(tier = %self.name, attempt, "lost a migration race; rerunning");
                    attempt += 1;
                }
                Err(MigrateError::Execute(inner)) => return Err(self.map(inner)),
                Err(other) => return Err(Error::backend(&self.name, other)),
            }
        }
    }

    fn map(&self, error: sqlx::Error) -> Error {
        map_error(&self.name, self.busy_timeout, error)
    }

    fn failed(&self, error: sqlx::Error) -> Error {
        self.stats.errors.incr();
        let error = self.map(error);
        tracing::debug!(tier = %self.name, %error, "database call failed");
        error
    }

    /// A write (`json`) or a delete of `key`, in one immediate transaction (it takes the write
    /// lock first, so the check and the change see the same row).
    async fn change(
        &self,
        key: &str,
        json: Option<&str>,
        expected: Option<Version>,
    ) -> std::result::Result<Written, Changed> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let stored: Option<(String, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.get.as_str()))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        let current = stored
            .as_ref()
            .map_or(0, |(_, v)| u64::try_from(*v).unwrap_or(0));
        if let Some(expected) = expected.filter(|e| *e != current) {
            return Err(Changed::Conflict { expected, current });
        }
        let version: i64 = match (json, &stored) {
            (Some(json), Some((old, _))) if old == json => {
                return Ok(Written::Unchanged(current));
            }
            (None, None) => return Ok(Written::Unchanged(0)),
            (Some(json), _) => {
                sqlx::query(AssertSqlSafe(self.sql.write.as_str()))
                    .bind(key)
                    .bind(json)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query_scalar(AssertSqlSafe(self.sql.version.as_str()))
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?
            }
            (None, Some(_)) => {
                sqlx::query(AssertSqlSafe(self.sql.delete.as_str()))
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query_scalar(AssertSqlSafe(self.sql.last_version.as_str()))
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        self.wake.notify_waiters();
        Ok(Written::Changed(u64::try_from(version).unwrap_or(0)))
    }

    fn failed_change(&self, failure: Changed) -> Error {
        match failure {
            Changed::Conflict { expected, current } => Error::Conflict {
                tier: self.name.clone(),
                expected,
                current,
            },
            Changed::Sql(error) => self.failed(error),
        }
    }
}

#[async_trait]
impl<K, V> Source<K, V> for SqliteSource<K, V>
where
    K: StorageKey,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let key = key.storage_key();
        let row: Option<(String, i64)> = sqlx::query_as(AssertSqlSafe(self.sql.get.as_str()))
            .bind(key.as_ref())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        let row = row.as_ref().map(|(json, v)| (json.as_str(), *v));
        tiercache_sql::found(&self.name, &self.stats, &key, row)
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<String> = keys.iter().map(|k| k.storage_key().into_owned()).collect();
        let list = serde_json::to_string(&texts).expect("strings serialize");
        let rows = sqlx::query(AssertSqlSafe(self.sql.get_many.as_str()))
            .bind(list)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<std::result::Result<Vec<(String, String, i64)>, sqlx::Error>>()
            .map_err(|e| self.failed(e))?;
        tiercache_sql::in_order(&self.name, &self.stats, &texts, rows)
    }

    async fn write(&self, key: &K, value: Arc<V>, expected: Option<Version>) -> Result<Written> {
        let json = tiercache_sql::to_json(&*value)?;
        let key = key.storage_key();
        self.change(&key, Some(&json), expected)
            .await
            .map_err(|e| self.failed_change(e))
    }

    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
        let key = key.storage_key();
        self.change(&key, None, expected)
            .await
            .map_err(|e| self.failed_change(e))
    }

    /// Reads the change log past the last position applied: at once after this tier's own
    /// commits, and when `PRAGMA data_version` on a connection of the follower's own says
    /// another connection committed (polled every [`feed_poll`](SqliteSourceBuilder::feed_poll)).
    fn follow(&self) -> Option<ChangeFeed<K, V>> {
        let table = self.table.clone();
        let in_memory = self.path.as_os_str() == IN_MEMORY;
        let follower = feed::Follower {
            file: (!in_memory).then(|| self.path.clone()),
            busy_timeout: self.busy_timeout,
            pool: self.pool.clone(),
            name: self.name.clone(),
            start: self.start,
            wake: Arc::clone(&self.wake),
            since_sql: fill(
                &table,
                "SELECT position, key, version, op FROM {changes} \
                 WHERE position > ?1 ORDER BY position LIMIT ?2",
            ),
            pruned_sql: fill(&table, "SELECT pruned_through FROM {feed} WHERE id = 1"),
            prune_sql: Arc::clone(&self.prune_sql),
            prune_failures: Arc::clone(&self.prune_failures),
            retention: self.change_retention,
            poll: self.feed_poll,
            _keys: PhantomData,
        };
        Some(follower.start())
    }

    fn stats(&self) -> TierStats {
        self.stats.tier_stats(&self.name)
    }

    async fn history(
        &self,
        key: &K,
        before: Option<Version>,
        limit: usize,
    ) -> Result<Vec<Revision<V>>> {
        let key = key.storage_key();
        let before = before.map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let rows: Vec<(Option<String>, i64, i64, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(self.sql.history.as_str()))
                .bind(key.as_ref())
                .bind(before)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.failed(e))?;
        rows.into_iter()
            .map(|row| tiercache_sql::revision(&self.name, &self.stats, &key, row))
            .collect()
    }

    async fn revision(&self, key: &K, version: Version) -> Result<Option<Revision<V>>> {
        let key = key.storage_key();
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        let row: Option<(Option<String>, i64, i64, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(self.sql.revision.as_str()))
                .bind(key.as_ref())
                .bind(version)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.failed(e))?;
        row.map(|row| tiercache_sql::revision(&self.name, &self.stats, &key, row))
            .transpose()
    }

    async fn purge_history(&self, key: &K) -> Result<u64> {
        let key = key.storage_key();
        let done = sqlx::query(AssertSqlSafe(self.sql.purge_history.as_str()))
            .bind(key.as_ref())
            .execute(&self.pool)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(done.rows_affected())
    }
}

/// Configures a [`SqliteSource`]; see [`SqliteSource::builder`].
#[must_use]
pub struct SqliteSourceBuilder<K, V> {
    path: PathBuf,
    table: String,
    max_connections: u32,
    busy_timeout: Duration,
    change_retention: Duration,
    feed_poll: Duration,
    name: String,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Default for SqliteSourceBuilder<K, V> {
    fn default() -> Self {
        SqliteSourceBuilder {
            path: PathBuf::from(DEFAULT_PATH),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            change_retention: DEFAULT_CHANGE_RETENTION,
            feed_poll: DEFAULT_FEED_POLL,
            name: DEFAULT_NAME.to_owned(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for SqliteSourceBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteSourceBuilder")
            .field("path", &self.path)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static>
    SqliteSourceBuilder<K, V>
{
    /// The database file, created (with its directory) if missing, or [`IN_MEMORY`]. Defaults
    /// to [`DEFAULT_PATH`] in the working directory.
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// The table, a plain identifier (`^[a-z_][a-z0-9_]{0,62}$`). Defaults to
    /// [`DEFAULT_TABLE`].
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

    /// How long an entry stays in the change log. Defaults to [`DEFAULT_CHANGE_RETENTION`].
    pub fn change_retention(mut self, retention: Duration) -> Self {
        self.change_retention = retention;
        self
    }

    /// How often a follower looks for other connections' commits (`PRAGMA data_version`, no
    /// disk read). Defaults to [`DEFAULT_FEED_POLL`].
    pub fn feed_poll(mut self, interval: Duration) -> Self {
        self.feed_poll = interval;
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
    /// [`Error::Config`] for a table name that is not a plain identifier
    /// (`^[a-z_][a-z0-9_]{0,62}$`), a pool of zero connections, a zero busy timeout or an empty
    /// path; [`Error::Unavailable`], [`Error::Timeout`] or [`Error::Backend`] if the file cannot
    /// be created, opened or migrated.
    pub async fn build(self) -> Result<SqliteSource<K, V>> {
        if !valid_identifier(&self.table) {
            return Err(Error::Config(format!(
                "table `{}` is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 characters)",
                self.table
            )));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.busy_timeout.is_zero()
            || self.change_retention.is_zero()
            || self.feed_poll.is_zero()
        {
            return Err(Error::Config(
                "busy_timeout, change_retention and feed_poll must be positive".into(),
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Error::Config("the SQLite path is empty".into()));
        }
        let in_memory = self.path.as_os_str() == IN_MEMORY;
        if !in_memory && let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::backend(&self.name, e))?;
        }
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
        // Tiers of one process open and migrate one at a time: a new file's first connections
        // (switching it to WAL) and its first migration can deadlock on SQLite's locks, each
        // waiting out the busy timeout (8 tiers opening one new file at once did, about one
        // time in ten).
        static OPENING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = OPENING.lock().await;
        let pool = pool_options
            .connect_with(options)
            .await
            .map_err(|e| map_error(&self.name, self.busy_timeout, e))?;
        let t = format!("\"{}\"", self.table);
        let mut tier = SqliteSource {
            pool,
            path: self.path,
            start: 0,
            wake: Arc::new(tokio::sync::Notify::new()),
            change_retention: self.change_retention,
            feed_poll: self.feed_poll,
            sql: Statements {
                get: format!("SELECT value, version FROM {t} WHERE key = ?1"),
                get_many: format!(
                    "SELECT key, value, version FROM {t} \
                     WHERE key IN (SELECT value FROM json_each(?1))"
                ),
                // The triggers give the version and record the change.
                write: format!(
                    "INSERT INTO {t} (key, value) VALUES (?1, ?2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                ),
                version: format!("SELECT version FROM {t} WHERE key = ?1"),
                delete: format!("DELETE FROM {t} WHERE key = ?1"),
                last_version: fill(&self.table, "SELECT last FROM {versions}"),
                history: fill(
                    &self.table,
                    &format!(
                        "SELECT value, version, {MICROS}, NULL FROM {{history}} \
                         WHERE key = ?1 AND version < ?2 ORDER BY version DESC LIMIT ?3"
                    ),
                ),
                // The current version may be older than the history keeps: the table has it.
                revision: fill(
                    &self.table,
                    &format!(
                        "SELECT value, version, {MICROS}, NULL FROM {{history}} \
                         WHERE key = ?1 AND version = ?2 \
                         UNION ALL SELECT value, version, {}, NULL FROM {{table}} \
                         WHERE key = ?1 AND version = ?2 LIMIT 1",
                        MICROS.replace("at)", "updated_at)")
                    ),
                ),
                purge_history: fill(&self.table, "DELETE FROM {history} WHERE key = ?1"),
            },
            prune_sql: Arc::new(feed::prune_sql(|sql| fill(&self.table, sql))),
            prune_failures: Arc::default(),
            table: self.table,
            name: self.name,
            busy_timeout: self.busy_timeout,
            stats: RowStats::default(),
            _types: PhantomData,
        };
        tier.migrate().await?;
        // Where this tier's history starts: its followers catch up from here, so nothing it
        // reads from now on can miss a later change.
        tier.start = sqlx::query_scalar(AssertSqlSafe(fill(
            &tier.table,
            "SELECT max(COALESCE((SELECT max(position) FROM {changes}), 0), \
             (SELECT pruned_through FROM {feed} WHERE id = 1))",
        )))
        .fetch_one(&tier.pool)
        .await
        .map_err(|e| tier.failed(e))?;
        Ok(tier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    type Tier = SqliteSource<String, serde_json::Value>;

    #[test]
    fn errors_are_classified() {
        let busy = Duration::from_millis(300);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_error("sqlite", busy, sqlx::Error::Io(refused)),
            Error::Unavailable { .. }
        ));
        let timed_out = map_error("sqlite", busy, sqlx::Error::PoolTimedOut);
        assert!(timed_out.is_transient() && !timed_out.is_timeout());
        let other = map_error("sqlite", busy, sqlx::Error::RowNotFound);
        assert!(matches!(other, Error::Backend { .. }) && !other.is_transient());
    }

    #[tokio::test]
    async fn a_lock_held_past_the_busy_timeout_is_a_timeout() {
        let dir = std::env::temp_dir().join(format!(
            "tiercache_sqlite_unit_{}_{}",
            std::process::id(),
            line!()
        ));
        let file = dir.join("busy.sqlite3");
        let busy = Duration::from_millis(100);
        let t = Tier::builder()
            .path(&file)
            .busy_timeout(busy)
            .build()
            .await
            .unwrap();
        let other = Tier::builder().path(&file).build().await.unwrap();
        let mut conn = other.pool().acquire().await.unwrap();
        let tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
        let err = t
            .write(&"k".into(), Arc::new(serde_json::json!(1)), None)
            .await
            .map(Written::version)
            .unwrap_err();
        assert!(
            matches!(err, Error::Timeout { after, .. } if after == busy),
            "{err:?}"
        );
        assert_eq!(t.stats().errors, 1);
        tx.rollback().await.unwrap();
        drop(conn);
        assert_eq!(
            t.write(&"k".into(), Arc::new(serde_json::json!(2)), None)
                .await
                .map(Written::version)
                .unwrap(),
            1
        );
        drop((t, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bad_configuration_is_rejected() {
        let b = || Tier::builder().path(IN_MEMORY);
        for bad in [
            b().table("Bad-Name"),
            b().table("t".repeat(64)),
            b().max_connections(0),
            b().busy_timeout(Duration::ZERO),
            b().path(""),
        ] {
            let err = bad.build().await.unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
        }
    }

    #[tokio::test]
    async fn debug_shows_where_not_what() {
        let t = Tier::builder().path(IN_MEMORY).build().await.unwrap();
        t.write(
            &"k".into(),
            Arc::new(serde_json::json!("secret-config-value")),
            None,
        )
        .await
        .map(Written::version)
        .unwrap();
        let printed = format!("{t:?} {:?}", Tier::builder());
        assert!(printed.contains(":memory:"), "{printed}");
        assert!(!printed.contains("secret-config-value"), "{printed}");
    }
}

#[cfg(test)]
mod embedded_tests {
    /// Every file in `migrations/` is embedded, in order: a new migration file that is not
    /// added to `EMBEDDED` would never run.
    #[test]
    fn every_migration_file_is_embedded_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        tiercache_sql::check_embedded(&dir, super::EMBEDDED).unwrap();
    }
}
