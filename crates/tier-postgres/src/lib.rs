//! The PostgreSQL tier of tiercache: the authoritative source at the bottom of a chain.
//!
//! * One table (default `public.tiercache_entries`): `key text primary key`, `value jsonb`,
//!   `version bigint`, `updated_at timestamptz`, created by embedded migrations
//!   (`sqlx::migrate!`). The schema and the table name are configurable: the migrations' SQL
//!   names the table as `{table}`, replaced at run time by the validated, quoted,
//!   schema-qualified name, and each table keeps its own migration bookkeeping
//!   (`<schema>._tiercache_migrations_<table>`, shortened with a hash when that would exceed
//!   PostgreSQL's 63-byte identifiers), so several tables can live in one schema. Names must be
//!   plain identifiers: `^[a-z_][a-z0-9_]{0,62}$`.
//! * Versions come from the database, for every writer (this crate, `psql`, a migration,
//!   another service): a trigger gives each committed insert and update, and each delete, the
//!   next number of one sequence (`<table>_versions`), so a key's versions never repeat and
//!   never go backwards, even across a delete and a re-creation. An update that leaves the value
//!   as it is (`jsonb` equality) changes nothing. Upgrading a populated table starts the
//!   sequence above every stored version. Every change is recorded in the change log
//!   (`<table>_changes`: position, key, version, op, writing transaction, time) and announced
//!   with `NOTIFY` on [`channel`](PostgresTier::channel) at commit.
//! * Reads: one prepared primary-key `SELECT`; `get_many` one `= ANY($1)` query. Writes and
//!   deletes: one call of a function the migrations create (`<table>_write`,
//!   `<table>_delete`), which locks the row, checks the expected version (compare-and-set),
//!   skips a write of the stored value and reports what it did, in one round trip.
//!   PostgreSQL 13 or later (`pg_current_xact_id`).
//! * The pool connects lazily: [`PostgresTierBuilder::build`] needs no running server, and the
//!   migrations run on first use (once; retried on later calls if they failed), or when you
//!   call [`PostgresTier::migrate`]. The schema is created if it is missing.
//! * Acquire (1 s) and statement (1.5 s) time limits are short by default, below the chain's
//!   2 s source time limit, so that the tier's own error (and its fail-fast) is what the chain
//!   sees, not its own time-out. sqlx 0.9 has no time limit per connection attempt: the pool's
//!   own attempts (retried while the server refuses) are bounded by the acquire time limit;
//!   [`connect_timeout`](PostgresTierBuilder::connect_timeout) bounds the connections the tier
//!   opens itself (the probe below).
//! * Errors: a server that refuses or drops connections, I/O failures and a pool that stays
//!   busy are a transient [`Error::Unavailable`] (its source says which); a statement cancelled
//!   by `statement_timeout` (SQLSTATE 57014) is [`Error::Timeout`]; the rest is
//!   [`Error::Backend`]. After a connection failure, calls fail at once for 250 ms instead of
//!   each waiting out the acquire time limit.
//! * TLS comes from the URL: `?sslmode=verify-full&sslrootcert=/path/ca.pem` checks the
//!   server's certificate and host name (use it across any untrusted network); `require`
//!   encrypts without checking; through the system's OpenSSL.
//! * The password never appears in `Debug` output, errors or logs.
//!
//! A row whose JSON does not decode into `V` is [`Error::Corrupt`] naming the key, never a
//! default (a later update would destroy the user's data). PostgreSQL's `text` and `jsonb`
//! cannot hold a NUL character: a key or value with one is refused before any I/O with
//! [`Error::InvalidInput`] (the SQLite tier stores both).
//!
//! ```no_run
//! # async fn demo() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use tiercache_core::Source;
//! use tiercache_postgres::PostgresTier;
//!
//! let db = PostgresTier::<String, serde_json::Value>::builder()
//!     .url("postgres://app@db.internal:5432/app?sslmode=verify-full")
//!     .schema("tiercache")
//!     .build()?; // does not connect yet
//! let config = Arc::new(serde_json::json!({"theme": "dark"}));
//! let version = db.write(&"alice".into(), config, None).await?.version();
//! assert_eq!(db.get(&"alice".into()).await?.unwrap().version, version);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod feed;
mod migrate;

pub use feed::{DEFAULT_CHANGE_RETENTION, DEFAULT_FEED_POLL};
use migrate::{Migrations, Names, channel};
use tiercache_sql::{RowStats, error_chain, valid_identifier};

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};
use tiercache_core::{
    ChangeFeed, Counter, Entry, Error, Result, Source, StorageKey, TierStats, Version, Written,
};
use tokio::sync::OnceCell;

/// Default schema.
pub const DEFAULT_SCHEMA: &str = "public";
/// Default table.
pub const DEFAULT_TABLE: &str = "tiercache_entries";
/// Default pool size.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Default time limit for getting a connection from the pool, connecting included (sqlx keeps
/// retrying a refused connection until then). Below the chain's 2 s source time limit, so
/// that an unreachable server is reported as [`Error::Unavailable`] by the tier.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time limit of one statement (set on each connection as `statement_timeout`); below
/// the chain's default source time limit, so that the server cancels a slow statement itself.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Default tier name.
pub const DEFAULT_NAME: &str = "postgres";
/// After the server was found unreachable, calls fail at once for this long.
const FAIL_FAST_FOR: Duration = Duration::from_millis(250);
/// Default time limit of one connection attempt the tier makes outside its pool (the direct
/// attempt that tells a refused or silent server from a busy pool after an acquire time-out).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The PostgreSQL tier. See the [crate docs](crate).
pub struct PostgresTier<K, V> {
    pool: PgPool,
    options: PgConnectOptions,
    schema: String,
    table: String,
    sql: Statements,
    name: String,
    statement_timeout: Duration,
    connect_timeout: Duration,
    max_connections: u32,
    change_retention: Duration,
    feed_poll: Duration,
    migrations: Arc<Migrations>,
    down_until: AtomicU64,
    /// Nanoseconds since `epoch` until which a pool time-out is taken for a busy pool without a
    /// probe (the last probe found the server answering).
    busy_until: AtomicU64,
    /// A probe connection is being made (one at a time).
    probing: AtomicBool,
    epoch: Instant,
    stats: RowStats,
    probes: Counter,
    _types: PhantomData<fn() -> (K, V)>,
}

struct Statements {
    get: String,
    get_many: String,
    write: String,
    delete: String,
}

/// Clears the probing flag when the probe ends, finished or dropped with its caller.
struct Probing<'a>(&'a AtomicBool);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Connection settings without the password.
struct Redacted<'a>(&'a PgConnectOptions);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "postgres://{}@{}:{}/{} (sslmode {:?})",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or(""),
            o.get_ssl_mode()
        )
    }
}

impl<K, V> fmt::Debug for PostgresTier<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTier")
            .field("server", &Redacted(&self.options))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

pub use tiercache_sql::Undecodable;

/// The write or delete function answered with an outcome this version does not know (the
/// migrations and the code disagree).
#[derive(Debug, thiserror::Error)]
#[error("the database's write function reported `{0}`, which this version does not know")]
struct UnexpectedReport(String);

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
enum NoConnection {
    #[error("the database refused or dropped the connection: {0}")]
    Unreachable(String),
    #[error("no pooled connection became free in time (the pool is busy)")]
    PoolBusy,
    #[error("the database was unreachable moments ago; not retrying yet")]
    FailingFast,
}

/// Maps a sqlx error onto the core's; a cancelled statement ran out of `statement_timeout`.
pub(crate) fn map_error(tier: &str, statement_timeout: Duration, error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            Error::unavailable(tier, error)
        }
        sqlx::Error::PoolTimedOut => Error::unavailable(tier, NoConnection::PoolBusy),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("57014") => Error::Timeout {
                tier: tier.to_owned(),
                after: statement_timeout,
            },
            Some(code)
                if code.starts_with("08")
                    || matches!(code, "57P01" | "57P02" | "57P03" | "53300") =>
            {
                Error::unavailable(tier, error)
            }
            _ => Error::backend(tier, error),
        },
        _ => Error::backend(tier, error),
    }
}

/// Whether `error` says the connection it ran on is dead (not that the server refuses new
/// ones): I/O failures, and the server ending the session (SQLSTATE class 08, 57P01-57P03).
fn broken_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> PostgresTier<K, V> {
    /// Starts configuring a tier.
    pub fn builder() -> PostgresTierBuilder<K, V> {
        PostgresTierBuilder::default()
    }

    /// The longest a write can still run inside PostgreSQL after it was sent: its statement
    /// time limit. A chain over this tier waits this long (plus a margin) before it settles a
    /// write whose outcome it could not learn (`TieredCacheBuilder::write_settle`).
    #[must_use]
    pub fn longest_write(&self) -> Duration {
        self.statement_timeout
    }

    /// The connection pool (for operators and tests; the tier's own statements go through it
    /// too).
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema-qualified table, as used in statements.
    #[must_use]
    pub fn qualified_table(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }

    /// The schema-qualified change log table: one row per committed change of the table, by
    /// any writer (`position`, `key`, `version`, `op`, `txid`, `at`).
    #[must_use]
    pub fn changes_table(&self) -> String {
        self.names().get("{changes}").to_owned()
    }

    /// The channel every committed change is announced on (`LISTEN` to it).
    #[must_use]
    pub fn channel(&self) -> String {
        channel(&self.schema, &self.table)
    }

    /// Deletes the change log's entries older than the retention
    /// ([`change_retention`](PostgresTierBuilder::change_retention)) and records what it
    /// removed, so that a follower cut off for longer empties its caches instead of missing
    /// changes. Followers do it by themselves once a minute (one at a time); returns the
    /// entries deleted (0 when another instance is pruning now).
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the server cannot be reached.
    pub async fn prune_changes(&self) -> Result<u64> {
        let sql = feed::prune_sql(&self.names());
        let lock = feed::prune_lock(&self.changes_table());
        let retention = self.change_retention.as_secs_f64();
        let done = self
            .run(false, || {
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(retention)
                    .bind(lock)
                    .fetch_optional(&self.pool)
            })
            .await?;
        Ok(done
            .and_then(|row| row.try_get::<i64, _>(0).ok())
            .map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    fn names(&self) -> Names {
        Names::new(&self.schema, &self.table)
    }

    /// Creates the schema and the table if they are missing, and applies any migration the
    /// table has not had. Idempotent; concurrent callers, in this process or others, are
    /// serialized by sqlx's advisory lock. Calls run this once by themselves before their
    /// first statement, so calling it is optional: it reports problems (permissions, say)
    /// at start-up rather than on the first request.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the server cannot be reached, [`Error::Backend`] if a
    /// migration fails or was changed after it was applied.
    pub async fn migrate(&self) -> Result<()> {
        self.migrations.run().await
    }

    /// What a service's role needs on this tier's objects, and nothing more: to read and write
    /// the table (through its functions), have versions numbered, log changes and follow the
    /// log (read it, prune it), and check the migrations. Applied with the privileges of this
    /// tier's own role (the migrations' owner). See docs/operations.md.
    ///
    /// # Errors
    /// [`Error::Config`] if `role` is not a plain identifier (lower-case letters, digits and
    /// `_`); the database's refusal otherwise.
    pub async fn grant_to(&self, role: &str) -> Result<()> {
        if !tiercache_sql::valid_identifier(role) {
            return Err(Error::Config(format!(
                "role {role:?} must be a lower-case identifier of letters, digits and _"
            )));
        }
        self.migrate().await?;
        let names = self.names();
        let role = format!("\"{role}\"");
        let log_sequence: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT pg_get_serial_sequence('{}', 'position')",
            names.get("{changes}").replace('\'', "''")
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_error(&self.name, self.statement_timeout, e))?;
        let mut statements = vec![
            format!("GRANT USAGE ON SCHEMA \"{}\" TO {role}", self.schema),
            names.fill(&format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {{table}} TO {role}"
            )),
            names.fill(&format!(
                "GRANT SELECT, INSERT, DELETE ON {{changes}} TO {role}"
            )),
            names.fill(&format!("GRANT SELECT, UPDATE ON {{feed}} TO {role}")),
            names.fill(&format!("GRANT USAGE ON SEQUENCE {{versions}} TO {role}")),
            names.fill(&format!("GRANT EXECUTE ON FUNCTION {{write_fn}} TO {role}")),
            names.fill(&format!(
                "GRANT EXECUTE ON FUNCTION {{delete_fn}} TO {role}"
            )),
            format!(
                "GRANT SELECT ON \"{}\".\"{}\" TO {role}",
                self.schema,
                migrate::bookkeeping_table(&self.table)
            ),
        ];
        if let Some(sequence) = log_sequence {
            statements.push(format!("GRANT USAGE ON SEQUENCE {sequence} TO {role}"));
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| map_error(&self.name, self.statement_timeout, e))?;
        for statement in statements {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(|e| map_error(&self.name, self.statement_timeout, e))?;
        }
        tx.commit()
            .await
            .map_err(|e| map_error(&self.name, self.statement_timeout, e))
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs `call` (after the migrations), failing fast while the server is known to be
    /// unreachable. A read (`retry_broken`) that fails on a pooled connection that turned out
    /// dead (the server restarted, or dropped it while idle) is run again on another, up to
    /// once per pooled connection: the pool does not test connections before handing them out
    /// (that costs a round trip per call), so a read finds a dead one this way instead.
    async fn run<T, F, Fut>(&self, retry_broken: bool, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    {
        if self.now_nanos() < self.down_until.load(Ordering::Relaxed) {
            self.stats.errors.incr();
            return Err(Error::unavailable(&self.name, NoConnection::FailingFast));
        }
        let result = match self.migrations.start().await.map(|_| ()) {
            Ok(()) => {
                let mut result = call().await;
                let mut retries = if retry_broken {
                    self.max_connections
                } else {
                    0
                };
                while retries > 0 && result.as_ref().is_err_and(broken_connection) {
                    tracing::debug!(tier = %self.name, "pooled connection dead; read retried");
                    retries -= 1;
                    result = call().await;
                }
                result.map_err(|e| self.explain(e))
            }
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(value) => Ok(value),
            Err(e) => Err(self.explain_core(e).await),
        };
        if let Err(error) = &result {
            self.stats.errors.incr();
            tracing::debug!(tier = %self.name, %error, "database call failed");
        }
        result
    }

    /// A pooled connection that answers a ping: for writes, which are not retried (a write
    /// that failed on a dead connection may or may not have been applied). Dead ones are taken
    /// out of the pool, up to once per pooled connection.
    async fn live_connection(
        &self,
    ) -> std::result::Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        let mut left = self.max_connections;
        loop {
            let mut conn = self.pool.acquire().await?;
            match conn.ping().await {
                Ok(()) => return Ok(conn),
                Err(e) if left > 0 && broken_connection(&e) => {
                    left -= 1;
                    drop(conn.detach());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn explain(&self, error: sqlx::Error) -> Error {
        map_error(&self.name, self.statement_timeout, error)
    }

    /// A pool time-out says little: a direct connection attempt (a probe) tells "the server
    /// refuses connections" from "the pool is busy". One probe at a time: the callers that
    /// time out meanwhile, and those in the window after a probe found the server answering,
    /// are told the pool is busy without opening a connection each (a busy pool's waiters would
    /// otherwise exhaust the server's connections). While the server is unreachable, calls fail
    /// fast for a moment instead of each waiting out the acquire time limit.
    async fn explain_core(&self, error: Error) -> Error {
        let Error::Unavailable { source, .. } = &error else {
            return error;
        };
        let pool_busy = source
            .downcast_ref::<NoConnection>()
            .is_some_and(|n| matches!(n, NoConnection::PoolBusy));
        let reason = if pool_busy {
            if self.now_nanos() < self.busy_until.load(Ordering::Relaxed)
                || self.probing.swap(true, Ordering::AcqRel)
            {
                return error;
            }
            let _probing = Probing(&self.probing);
            self.probes.incr();
            let probe = self.options.connect();
            match tokio::time::timeout(self.connect_timeout, probe).await {
                Ok(Ok(conn)) => {
                    // The server answers: the pool is busy, not the server down.
                    let until =
                        self.now_nanos() + u64::try_from(FAIL_FAST_FOR.as_nanos()).unwrap_or(0);
                    self.busy_until.store(until, Ordering::Relaxed);
                    let _ = tokio::time::timeout(self.connect_timeout, conn.close()).await;
                    return error;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer to a connection attempt".to_owned(),
            }
        } else {
            error_chain(&error)
        };
        let until = self.now_nanos() + u64::try_from(FAIL_FAST_FOR.as_nanos()).unwrap_or(0);
        self.down_until.store(until, Ordering::Relaxed);
        Error::unavailable(&self.name, NoConnection::Unreachable(reason))
    }

    /// Probe connections opened so far to tell a busy pool from a server that is down.
    #[must_use]
    pub fn probes(&self) -> u64 {
        self.probes.get()
    }

    /// Runs the write (`json`) or delete function for `key` and reads its report. A write is
    /// never retried: one that failed on a dead connection may or may not have been applied.
    async fn change(
        &self,
        sql: &str,
        key: &str,
        json: Option<&str>,
        expected: Option<Version>,
    ) -> Result<Written> {
        let expected_sql = match expected {
            Some(v) => Some(i64::try_from(v).map_err(|_| {
                Error::InvalidInput(format!("expected version {v} is out of range"))
            })?),
            None => None,
        };
        // Whether the statement went out: a connection lost after that may have committed it.
        let sent = AtomicBool::new(false);
        let (outcome, version): (String, i64) = self
            .run(false, || async {
                let mut conn = self.live_connection().await?;
                sent.store(true, Ordering::Relaxed);
                let query = sqlx::query_as(AssertSqlSafe(sql)).bind(key);
                let query = match json {
                    Some(json) => query.bind(json),
                    None => query,
                };
                query.bind(expected_sql).fetch_one(&mut *conn).await
            })
            .await
            .map_err(|e| match e {
                Error::Unavailable { source, .. } if sent.load(Ordering::Relaxed) => {
                    Error::Interrupted {
                        tier: self.name.clone(),
                        source,
                    }
                }
                other => other,
            })?;
        let version = u64::try_from(version).unwrap_or(0);
        match outcome.as_str() {
            "W" | "D" => Ok(Written::Changed(version)),
            "N" => Ok(Written::Unchanged(version)),
            "C" => Err(Error::Conflict {
                tier: self.name.clone(),
                expected: expected.unwrap_or(0),
                current: version,
            }),
            other => Err(Error::backend(
                &self.name,
                UnexpectedReport(other.to_owned()),
            )),
        }
    }
}

/// PostgreSQL's `text` cannot hold a NUL character: such a key is refused before any I/O.
fn check_key(key: &str) -> Result<()> {
    if key.contains('\0') {
        return Err(Error::InvalidInput(
            "the key contains a NUL character, which PostgreSQL text cannot hold".into(),
        ));
    }
    Ok(())
}

/// Whether serde_json's text `json` holds an escaped NUL (`\u0000`, inside a string), which
/// `jsonb` refuses. A `\u0000` preceded by an odd number of backslashes is the escape; after an
/// even number, the backslashes are escaped ones and the `u0000` is plain text.
fn has_escaped_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    json.match_indices("u0000").any(|(at, _)| {
        let backslashes = bytes[..at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        backslashes % 2 == 1
    })
}

#[async_trait]
impl<K, V> Source<K, V> for PostgresTier<K, V>
where
    K: StorageKey,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let key = key.storage_key();
        check_key(&key)?;
        let row = self
            .run(true, || {
                sqlx::query(AssertSqlSafe(self.sql.get.as_str()))
                    .bind(key.as_ref())
                    .fetch_optional(&self.pool)
            })
            .await?;
        let row = match row {
            Some(row) => {
                let json: String = row.try_get(0).map_err(|e| self.explain(e))?;
                let version: i64 = row.try_get(1).map_err(|e| self.explain(e))?;
                Some((json, version))
            }
            None => None,
        };
        let row = row.as_ref().map(|(json, v)| (json.as_str(), *v));
        tiercache_sql::found(&self.name, &self.stats, &key, row)
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<String> = keys.iter().map(|k| k.storage_key().into_owned()).collect();
        for key in &texts {
            check_key(key)?;
        }
        let rows = self
            .run(true, || {
                sqlx::query(AssertSqlSafe(self.sql.get_many.as_str()))
                    .bind(&texts)
                    .fetch_all(&self.pool)
            })
            .await?;
        let rows = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<std::result::Result<Vec<(String, String, i64)>, sqlx::Error>>()
            .map_err(|e| self.explain(e))?;
        tiercache_sql::in_order(&self.name, &self.stats, &texts, rows)
    }

    async fn write(&self, key: &K, value: Arc<V>, expected: Option<Version>) -> Result<Written> {
        let json = tiercache_sql::to_json(&*value)?;
        if has_escaped_nul(&json) {
            return Err(Error::InvalidInput(
                "the value contains a NUL character (\\u0000), which PostgreSQL jsonb cannot hold"
                    .into(),
            ));
        }
        let key = key.storage_key();
        check_key(&key)?;
        self.change(&self.sql.write, &key, Some(&json), expected)
            .await
    }

    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
        let key = key.storage_key();
        check_key(&key)?;
        self.change(&self.sql.delete, &key, None, expected).await
    }

    /// Listens on the table's channel on a connection of its own (outside the tier's pool, so
    /// that a follower per chain takes nothing from the statements), and catches up from the
    /// change log through the pool after every reconnect (see the `feed` module).
    fn follow(&self) -> Option<ChangeFeed<K>> {
        let names = self.names();
        let listening = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout.max(Duration::from_secs(1)))
            .connect_lazy_with(self.options.clone());
        let follower = feed::Follower {
            migrations: Arc::clone(&self.migrations),
            listening,
            pool: self.pool.clone(),
            name: self.name.clone(),
            channel: self.channel(),
            horizon_sql: names.fill(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
                 (SELECT pruned_below FROM {feed} WHERE id = 1)",
            ),
            since_sql: names
                .fill("SELECT key, version, op FROM {changes} WHERE txid >= $1 ORDER BY position"),
            key_at_sql: names.fill("SELECT key FROM {changes} WHERE position = $1"),
            prune_sql: feed::prune_sql(&names),
            lock_key: feed::prune_lock(&self.changes_table()),
            retention: self.change_retention,
            poll: self.feed_poll,
            _keys: PhantomData,
        };
        Some(follower.start())
    }

    fn stats(&self) -> TierStats {
        self.stats.tier_stats(&self.name)
    }
}

/// Configures a [`PostgresTier`]; see [`PostgresTier::builder`].
#[must_use]
pub struct PostgresTierBuilder<K, V> {
    url: Option<String>,
    options: Option<PgConnectOptions>,
    schema: String,
    table: String,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    connect_timeout: Duration,
    change_retention: Duration,
    feed_poll: Duration,
    run_migrations: bool,
    name: String,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Default for PostgresTierBuilder<K, V> {
    fn default() -> Self {
        PostgresTierBuilder {
            url: None,
            options: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            change_retention: DEFAULT_CHANGE_RETENTION,
            feed_poll: DEFAULT_FEED_POLL,
            run_migrations: true,
            name: DEFAULT_NAME.to_owned(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for PostgresTierBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = match (&self.options, &self.url) {
            (Some(o), _) => format!("{:?}", Redacted(o)),
            (None, Some(url)) => url
                .parse::<PgConnectOptions>()
                .map(|o| format!("{:?}", Redacted(&o)))
                .unwrap_or_else(|_| "<invalid url>".to_owned()),
            (None, None) => "<from PG* environment>".to_owned(),
        };
        f.debug_struct("PostgresTierBuilder")
            .field("server", &server)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static>
    PostgresTierBuilder<K, V>
{
    /// The server, as a URL: `postgres://user[:password]@host[:port]/database[?sslmode=...]`;
    /// use `sslmode=verify-full` (with `sslrootcert=...` for a private CA) to check the
    /// server's certificate. The URL is never logged, and the password never appears in
    /// `Debug` output. Without a URL or [`connect_options`](Self::connect_options), the libpq
    /// `PG*` environment variables apply.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The server, as sqlx connect options (instead of a URL; takes precedence over one).
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The schema of the table, created if missing; a plain identifier
    /// (`^[a-z_][a-z0-9_]{0,62}$`). Defaults to [`DEFAULT_SCHEMA`].
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table, a plain identifier (`^[a-z_][a-z0-9_]{0,62}$`). Each table is a separate
    /// store with its own migration bookkeeping. Defaults to [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Pool size. Defaults to [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Time limit for getting a pooled connection. Defaults to [`DEFAULT_ACQUIRE_TIMEOUT`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Time limit of one statement, set as `statement_timeout` on each connection; a statement
    /// that runs longer is cancelled by the server and the call fails with [`Error::Timeout`].
    /// Defaults to [`DEFAULT_STATEMENT_TIMEOUT`].
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Time limit of one connection attempt the tier makes outside its pool: after an acquire
    /// time-out, a direct attempt tells a server that refuses connections or does not answer
    /// (the call fails with [`Error::Unavailable`] saying so, and calls fail fast for a moment)
    /// from a pool that is merely busy. sqlx 0.9 has no per-attempt limit for the pool's own
    /// connections: those are bounded by [`acquire_timeout`](Self::acquire_timeout), within
    /// which a refused connection is retried. Defaults to [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an entry stays in the change log: how long a chain's follower may be cut off
    /// and still catch up without emptying its caches. Followers prune older entries (one at a
    /// time). Defaults to [`DEFAULT_CHANGE_RETENTION`].
    pub fn change_retention(mut self, retention: Duration) -> Self {
        self.change_retention = retention;
        self
    }

    /// Whether the tier applies missing migrations on first use (`true`, the default), or only
    /// checks that none is missing and fails with a message naming `userconfig migrate`
    /// (`false`: for a role that may read and write the table but not create objects; run
    /// [`PostgresTier::migrate`] with a privileged role first). An explicit
    /// [`PostgresTier::migrate`] applies them either way.
    pub fn run_migrations(mut self, on: bool) -> Self {
        self.run_migrations = on;
        self
    }

    /// Interval of a follower's catch-up read of the change log, besides the announcements it
    /// listens to: it bounds how long a change whose announcement was lost stays unseen, and
    /// how much a reconnect has to read. Defaults to [`DEFAULT_FEED_POLL`].
    pub fn feed_poll(mut self, interval: Duration) -> Self {
        self.feed_poll = interval;
        self
    }

    /// The tier's name in stats and errors. Defaults to [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the tier. Nothing connects until the first call, so no server is needed; a Tokio
    /// runtime is (sqlx's pool starts its maintenance task here).
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that does not parse (the message never repeats it), a schema
    /// or table name that is not a plain identifier (`^[a-z_][a-z0-9_]{0,62}$`), a pool of zero
    /// connections, a zero time limit, or a call outside a Tokio runtime.
    pub fn build(self) -> Result<PostgresTier<K, V>> {
        let options = match (self.options, &self.url) {
            (Some(o), _) => o,
            (None, Some(url)) => url.parse::<PgConnectOptions>().map_err(|_| {
                Error::Config(
                    "the PostgreSQL URL does not parse; expected postgres://user@host:port/database"
                        .into(),
                )
            })?,
            (None, None) => PgConnectOptions::new(),
        };
        for (what, name) in [("schema", &self.schema), ("table", &self.table)] {
            if !valid_identifier(name) {
                return Err(Error::Config(format!(
                    "{what} `{name}` is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 \
                     characters)"
                )));
            }
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.acquire_timeout.is_zero()
            || self.statement_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.change_retention.is_zero()
            || self.feed_poll.is_zero()
        {
            return Err(Error::Config(
                "acquire_timeout, statement_timeout, connect_timeout, change_retention and \
                 feed_poll must be positive"
                    .into(),
            ));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "PostgresTier::builder().build() must be called inside a Tokio runtime".into(),
            ));
        }
        let options = options
            .options([(
                "statement_timeout",
                format!("{}ms", self.statement_timeout.as_millis()),
            )])
            .application_name("tiercache");
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            // No ping before each call (a round trip, a fifth of a read): reads retry on a
            // connection found dead, writes ping their own (`live_connection`).
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let names = Names::new(&self.schema, &self.table);
        let sql = Statements {
            get: names.fill("SELECT value::text, version FROM {table} WHERE key = $1"),
            get_many: names
                .fill("SELECT key, value::text, version FROM {table} WHERE key = ANY($1)"),
            write: names.fill("SELECT outcome, version FROM {write_fn}($1, $2::jsonb, $3)"),
            delete: names.fill("SELECT outcome, version FROM {delete_fn}($1, $2)"),
        };
        let migrations = Arc::new(Migrations {
            options: options.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
            name: self.name.clone(),
            acquire_timeout: self.acquire_timeout,
            statement_timeout: self.statement_timeout,
            apply_on_first_use: self.run_migrations,
            done: OnceCell::new(),
        });
        Ok(PostgresTier {
            pool,
            options,
            schema: self.schema,
            table: self.table,
            sql,
            name: self.name,
            statement_timeout: self.statement_timeout,
            connect_timeout: self.connect_timeout,
            max_connections: self.max_connections,
            change_retention: self.change_retention,
            feed_poll: self.feed_poll,
            migrations,
            down_until: AtomicU64::new(0),
            busy_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
            stats: RowStats::default(),
            probes: Counter::default(),
            _types: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tier = PostgresTier<String, serde_json::Value>;

    #[tokio::test]
    async fn debug_never_shows_the_password() {
        let url = "postgres://app:s3cret-sentinel@db.internal:5433/app?sslmode=require";
        let builder = Tier::builder().url(url);
        let printed = format!("{builder:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        let tier = builder.build().unwrap();
        let printed = format!("{tier:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        assert!(printed.contains("app@db.internal:5433/app"), "{printed}");
        assert!(printed.contains("tiercache_entries"), "{printed}");

        let options = PgConnectOptions::new()
            .host("db.internal")
            .username("app")
            .password("s3cret-sentinel")
            .database("app");
        let builder = Tier::builder().connect_options(options).schema("cfg");
        let printed = format!("{builder:?}");
        let printed = format!("{printed} {:?}", builder.build().unwrap());
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        assert!(printed.contains("\"cfg\""), "{printed}");
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Tier::builder().build().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }

    #[tokio::test]
    async fn bad_configuration_is_rejected() {
        let b = Tier::builder;
        let err = b()
            .url("postgres://x:s3cret-sentinel@h:notaport/d")
            .build()
            .unwrap_err();
        assert!(!err.to_string().contains("s3cret-sentinel"), "{err}");
        assert!(b().schema("Public").build().is_err());
        assert!(b().schema("a;drop").build().is_err());
        assert!(b().table("t\"x").build().is_err());
        assert!(b().table("t".repeat(64)).build().is_err());
        assert!(b().table("t".repeat(63)).build().is_ok());
        assert!(b().max_connections(0).build().is_err());
        assert!(b().statement_timeout(Duration::ZERO).build().is_err());
        assert!(b().acquire_timeout(Duration::ZERO).build().is_err());
        assert!(b().connect_timeout(Duration::ZERO).build().is_err());
        for bad in [b().schema(""), b().table("1x"), b().max_connections(0)] {
            assert!(matches!(bad.build(), Err(Error::Config(_))));
        }
    }

    #[test]
    fn bookkeeping_tables_fit_in_an_identifier_and_stay_apart() {
        use crate::migrate::{MAX_IDENTIFIER, bookkeeping_table};
        assert_eq!(
            bookkeeping_table("tiercache_entries"),
            "_tiercache_migrations_tiercache_entries"
        );
        let long_a = format!("{}a", "t".repeat(62));
        let long_b = format!("{}b", "t".repeat(62));
        let (a, b) = (bookkeeping_table(&long_a), bookkeeping_table(&long_b));
        assert_ne!(a, b);
        assert!(a.len() <= MAX_IDENTIFIER && valid_identifier(&a), "{a}");
        assert_eq!(a, bookkeeping_table(&long_a), "stable");
        assert_eq!(bookkeeping_table(&"t".repeat(41)).len(), 63);
    }

    #[test]
    fn escaped_nuls_are_found_and_only_they() {
        let json = |s: &str| serde_json::to_string(&serde_json::json!({ "k": s })).unwrap();
        assert!(has_escaped_nul(&json("a\0b")));
        assert!(has_escaped_nul(&json("\\\0")));
        assert!(!has_escaped_nul(&json("plain")));
        // A backslash followed by the text `u0000` is not a NUL.
        assert!(!has_escaped_nul(&json("\\u0000")));
        assert!(!has_escaped_nul(&json("u0000")));
        assert!(check_key("a\0b").is_err() && check_key("alice").is_ok());
    }

    #[test]
    fn errors_are_classified() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_error("pg", Duration::from_secs(2), sqlx::Error::Io(refused)),
            Error::Unavailable { .. }
        ));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(map_error("pg", Duration::from_secs(2), sqlx::Error::Io(reset)).is_transient());
        assert!(map_error("pg", Duration::from_secs(2), sqlx::Error::PoolTimedOut).is_transient());
        let other = map_error("pg", Duration::from_secs(2), sqlx::Error::RowNotFound);
        assert!(matches!(other, Error::Backend { .. }) && !other.is_transient());
    }
}
