//! The PostgreSQL source of tiercache: the authority at the bottom of a chain.
//!
//! * One table (default `public.tiercache_entries`): `key text primary key`, `value jsonb`,
//!   `version bigint`, `updated_at timestamptz`, created by embedded migrations
//!   (`include_str!`). The schema and the table name are configurable: the migrations' SQL
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
//!   (`<table>_changes`: writing transaction, version, key, op, time). Nothing else runs in a
//!   writer's transaction: no `NOTIFY`, which would make every notifying commit of the
//!   instance wait its turn.
//! * The change feed ([`Source::follow`](tiercache_core::Source::follow)): one follower per
//!   chain, one of them elected (a session advisory lock) to read the log for the whole fleet
//!   every [`feed_poll`](PostgresSourceBuilder::feed_poll), with a snapshot as its cursor (so
//!   that no transaction held open anywhere holds it back); it applies each change to its
//!   chain's shared tiers and tells the others with `NOTIFY` from short transactions of its own
//!   that write nothing, on [`channel`](PostgresSource::channel). Where the server allows
//!   logical decoding (feature `logical`, on by default), it streams the WAL through a
//!   replication slot instead ([`logical_decoding`](PostgresSourceBuilder::logical_decoding)).
//!   See the `feed` module.
//! * Reads: one prepared primary-key `SELECT`; `get_many` one `= ANY($1)` query. Writes and
//!   deletes: one call of a function the migrations create (`<table>_write`,
//!   `<table>_delete`), which locks the row, checks the expected version (compare-and-set),
//!   skips a write of the stored value and reports what it did, in one round trip.
//!   PostgreSQL 13 or later (`pg_current_xact_id`, `xid8`, `pg_snapshot`).
//!
//! One file per job: `source.rs` (the statements and the `Source` impl), `connection.rs`
//! (pool, retries, probes), `error.rs` (SQLSTATEs onto the core's errors),
//! `feed/` (the change feed), `admin.rs` (migrations, grants, pruning by hand),
//! `builder.rs`, `migrate.rs` (the embedded migrations and the names of the objects).
//! * The pool connects lazily: [`PostgresSourceBuilder::build`] needs no running server, and the
//!   migrations run on first use (once; retried on later calls if they failed), or when you
//!   call [`PostgresSource::migrate`]. The schema is created if it is missing.
//! * Acquire (1 s) and statement (1.5 s) time limits are short by default, below the chain's
//!   2 s source time limit, so that the tier's own error (which says why) is what the chain
//!   sees, not its own time-out. sqlx 0.9 has no time limit per connection attempt: the pool's
//!   own attempts (retried while the server refuses) are bounded by the acquire time limit;
//!   [`connect_timeout`](PostgresSourceBuilder::connect_timeout) bounds the connections the tier
//!   opens itself (the probe below).
//! * Errors: a server that refuses or drops connections, I/O failures and a pool that stays
//!   busy are a transient [`Error::Unavailable`](tiercache_core::Error::Unavailable) (its
//!   source says which); a statement cancelled by `statement_timeout` (SQLSTATE 57014) is
//!   [`Error::Timeout`](tiercache_core::Error::Timeout); the rest is
//!   [`Error::Backend`](tiercache_core::Error::Backend). After a connection failure, calls fail at once for 250 ms instead of
//!   each waiting out the acquire time limit.
//! * TLS comes from the URL: `?sslmode=verify-full&sslrootcert=/path/ca.pem` checks the
//!   server's certificate and host name (use it across any untrusted network); `require`
//!   encrypts without checking; through the system's OpenSSL.
//! * The password never appears in `Debug` output, errors or logs.
//!
//! A row whose JSON does not decode into `V` is
//! [`Error::Corrupt`](tiercache_core::Error::Corrupt) naming the key, never a default (a later
//! update would destroy the user's data). PostgreSQL's `text` and `jsonb` cannot hold a NUL
//! character: a key or value with one is refused before any I/O with
//! [`Error::InvalidInput`](tiercache_core::Error::InvalidInput) (the SQLite source stores
//! both).
//!
//! ```no_run
//! # async fn demo() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use tiercache_core::Source;
//! use tiercache_postgres::PostgresSource;
//!
//! let db = PostgresSource::<String, serde_json::Value>::builder()
//!     .url("postgres://app@db.internal:5432/app?sslmode=verify-full")
//!     .schema("tiercache")
//!     .build()?; // does not connect yet
//! let config = Arc::new(serde_json::json!({"theme": "dark"}));
//! let version = db.write(&"alice".into(), config, None).await?.version();
//! assert_eq!(db.get(&"alice".into()).await?.unwrap().version, version);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod admin;
mod builder;
mod connection;
mod error;
mod feed;
mod migrate;
mod source;

use std::time::Duration;

pub use builder::PostgresSourceBuilder;
pub use feed::{
    DEFAULT_CHANGE_RETENTION, DEFAULT_ELECT_EVERY, DEFAULT_FEED_POLL, DEFAULT_HISTORY_RETENTION,
};
pub use source::PostgresSource;
pub use tiercache_sql::Undecodable;

/// Default schema.
pub const DEFAULT_SCHEMA: &str = "public";
/// Default table.
pub const DEFAULT_TABLE: &str = "tiercache_entries";
/// Default pool size.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// Default time limit for getting a connection from the pool, connecting included (sqlx keeps
/// retrying a refused connection until then). Below the chain's 2 s source time limit, so
/// that an unreachable server is reported as [`Error::Unavailable`](tiercache_core::Error::Unavailable) by the tier.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time limit of one statement (set on each connection as `statement_timeout`); below
/// the chain's default source time limit, so that the server cancels a slow statement itself.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Default tier name.
pub const DEFAULT_NAME: &str = "postgres";
/// Default time limit of one connection attempt the tier makes outside its pool (the direct
/// attempt that tells a refused or silent server from a busy pool after an acquire time-out).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
