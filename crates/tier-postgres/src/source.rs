//! [`PostgresSource`]: the statements a chain runs (reads, the write and delete functions)
//! and its change feed.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{AssertSqlSafe, Row};
use tiercache_core::{
    ChangeFeed, Counter, Entry, Error, Result, Revision, Source, StorageKey, TierStats, Version,
    Written,
};
use tiercache_sql::RowStats;

use crate::PostgresSourceBuilder;
use crate::connection::Redacted;
use crate::error::UnexpectedReport;
use crate::feed::{self, FeedCounters};
use crate::migrate::{Migrations, Names, channel};

/// The PostgreSQL tier. See the [crate docs](crate).
pub struct PostgresSource<K, V> {
    pub(crate) pool: PgPool,
    pub(crate) options: PgConnectOptions,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) sql: Statements,
    pub(crate) feed_sql: Arc<feed::Statements>,
    pub(crate) name: String,
    pub(crate) statement_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_connections: u32,
    pub(crate) change_retention: Duration,
    pub(crate) history_retention: Duration,
    pub(crate) feed_poll: Duration,
    pub(crate) elect_every: Duration,
    pub(crate) migrations: Arc<Migrations>,
    /// Nanoseconds since `epoch` until which a pool time-out is taken for a busy pool without a
    /// probe (the last probe found the server answering).
    pub(crate) busy_until: AtomicU64,
    /// A probe connection is being made (one at a time).
    pub(crate) probing: AtomicBool,
    pub(crate) epoch: Instant,
    pub(crate) stats: RowStats,
    pub(crate) probes: Counter,
    pub(crate) feed_counters: Arc<FeedCounters>,
    /// How the feed may stream the WAL (logical decoding); `None`: it reads the log.
    #[cfg(feature = "logical")]
    pub(crate) logical: Option<feed::LogicalSettings>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

pub(crate) struct Statements {
    pub(crate) get: String,
    pub(crate) get_many: String,
    pub(crate) write: String,
    pub(crate) delete: String,
    pub(crate) write_by: String,
    pub(crate) delete_by: String,
    pub(crate) history: String,
    pub(crate) revision: String,
    pub(crate) purge_history: String,
}

impl<K, V> fmt::Debug for PostgresSource<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSource")
            .field("server", &Redacted(&self.options))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> PostgresSource<K, V> {
    /// Starts configuring a tier.
    pub fn builder() -> PostgresSourceBuilder<K, V> {
        PostgresSourceBuilder::default()
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

    pub(crate) fn names(&self) -> Names {
        Names::new(&self.schema, &self.table)
    }

    /// Runs the write (`json`) or delete function for `key` and reads its report. A write is
    /// never retried: one that failed on a dead connection may or may not have been applied.
    async fn change(
        &self,
        sql: &str,
        key: &str,
        json: Option<&str>,
        expected: Option<Version>,
        author: Option<&str>,
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
                let query = query.bind(expected_sql);
                let query = match author {
                    Some(author) => query.bind(author),
                    None => query,
                };
                query.fetch_one(&mut *conn).await
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

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> PostgresSource<K, V> {
    /// A write, naming its author for the history when given.
    async fn write_as(
        &self,
        key: &K,
        value: &V,
        expected: Option<Version>,
        author: Option<&str>,
    ) -> Result<Written> {
        let json = tiercache_sql::to_json(value)?;
        if has_escaped_nul(&json) {
            return Err(Error::InvalidInput(
                "the value contains a NUL character (\\u0000), which PostgreSQL jsonb cannot hold"
                    .into(),
            ));
        }
        let key = key.storage_key();
        check_key(&key)?;
        let sql = if author.is_some() {
            &self.sql.write_by
        } else {
            &self.sql.write
        };
        self.change(sql, &key, Some(&json), expected, author).await
    }

    /// A delete, naming its author for the history when given.
    async fn delete_as(
        &self,
        key: &K,
        expected: Option<Version>,
        author: Option<&str>,
    ) -> Result<Written> {
        let key = key.storage_key();
        check_key(&key)?;
        let sql = if author.is_some() {
            &self.sql.delete_by
        } else {
            &self.sql.delete
        };
        self.change(sql, &key, None, expected, author).await
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
impl<K, V> Source<K, V> for PostgresSource<K, V>
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
        let row: Option<(String, i64)> = self
            .run(true, || {
                sqlx::query_as(AssertSqlSafe(self.sql.get.as_str()))
                    .bind(key.as_ref())
                    .fetch_optional(&self.pool)
            })
            .await?;
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
        self.write_as(key, &value, expected, None).await
    }

    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
        self.delete_as(key, expected, None).await
    }

    async fn write_by(
        &self,
        key: &K,
        value: Arc<V>,
        expected: Option<Version>,
        author: &str,
    ) -> Result<Written> {
        self.write_as(key, &value, expected, Some(author)).await
    }

    async fn delete_by(&self, key: &K, expected: Option<Version>, author: &str) -> Result<Written> {
        self.delete_as(key, expected, Some(author)).await
    }

    /// Listens on the table's channel on a connection of its own (outside the tier's pool, so
    /// that a follower per chain takes nothing from the statements), and catches up from the
    /// change log through the pool after every reconnect (see the `feed` module).
    fn follow(&self) -> Option<ChangeFeed<K, V>> {
        let follower = feed::Follower {
            migrations: Arc::clone(&self.migrations),
            options: self.options.clone().application_name("tiercache-feed"),
            connect_timeout: self.connect_timeout,
            name: self.name.clone(),
            channel: self.channel(),
            lock_key: feed::lead_lock(&self.changes_table()),
            sql: Arc::clone(&self.feed_sql),
            retention: self.change_retention,
            history_retention: self.history_retention,
            poll: self.feed_poll,
            elect_every: self.elect_every,
            counters: Arc::clone(&self.feed_counters),
            #[cfg(feature = "logical")]
            logical: self.logical.clone(),
            _types: PhantomData,
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
        check_key(&key)?;
        let before = before.map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .run(true, || {
                sqlx::query_as(AssertSqlSafe(self.sql.history.as_str()))
                    .bind(key.as_ref())
                    .bind(before)
                    .bind(limit)
                    .fetch_all(&self.pool)
            })
            .await?;
        rows.into_iter()
            .map(|row| tiercache_sql::revision(&self.name, &self.stats, &key, row))
            .collect()
    }

    async fn revision(&self, key: &K, version: Version) -> Result<Option<Revision<V>>> {
        let key = key.storage_key();
        check_key(&key)?;
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        let row = self
            .run(true, || {
                sqlx::query_as(AssertSqlSafe(self.sql.revision.as_str()))
                    .bind(key.as_ref())
                    .bind(version)
                    .fetch_optional(&self.pool)
            })
            .await?;
        row.map(|row| tiercache_sql::revision(&self.name, &self.stats, &key, row))
            .transpose()
    }

    async fn purge_history(&self, key: &K) -> Result<u64> {
        let key = key.storage_key();
        check_key(&key)?;
        let mut purged = 0;
        // In batches: a hot key may have many versions within the retention.
        loop {
            let gone = self
                .run(false, || {
                    sqlx::query(AssertSqlSafe(self.sql.purge_history.as_str()))
                        .bind(key.as_ref())
                        .bind(PURGE_BATCH)
                        .execute(&self.pool)
                })
                .await?
                .rows_affected();
            purged += gone;
            if gone < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
    }
}

/// Past versions deleted per statement when a key's history is purged.
const PURGE_BATCH: i64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

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
}
