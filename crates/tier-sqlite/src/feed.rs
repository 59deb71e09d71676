//! The change feed on SQLite: a follower per chain reads the change log past the last position
//! it applied. SQLite commits one writer at a time and numbers log entries inside the writing
//! transaction, so positions are in commit order and reading past a position skips nothing.
//! Across processes (and across this process's other pools), a commit is noticed with
//! `PRAGMA data_version` on the follower's own connection, polled; this tier's own commits wake
//! its followers at once. Every follower applies every change to every cache tier: SQLite is
//! one machine's database, and its instances few. The log is pruned by age, in batches; a
//! follower whose position is below what pruning removed reports [`Change::Everything`].

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};
use tiercache_core::feed::{self, ChangeSender};
use tiercache_core::{Change, ChangeFeed, Counter, FeedHealth, Scope, StorageKey};
use tokio::sync::Notify;

/// Default interval at which a follower looks for other connections' commits.
pub const DEFAULT_FEED_POLL: Duration = Duration::from_millis(5);
/// Default time an entry stays in the change log.
pub const DEFAULT_CHANGE_RETENTION: Duration = Duration::from_secs(3600);
/// How long a past version stays in the history (30 days).
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a follower prunes the log.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Entries read per query.
const BATCH: i64 = 1024;
/// Entries deleted per transaction when pruning (the write lock is let go between them).
const PRUNE_BATCH: i64 = 1000;

/// What a follower needs of its tier.
pub(crate) struct Follower<K, V> {
    /// The database file, for a connection of the follower's own; `None` in memory (the
    /// tier's one connection is shared).
    pub(crate) file: Option<PathBuf>,
    pub(crate) busy_timeout: Duration,
    pub(crate) pool: SqlitePool,
    pub(crate) name: String,
    /// Where the tier's history starts: the last position when it was opened.
    pub(crate) start: i64,
    pub(crate) wake: Arc<Notify>,
    /// `SELECT position, key, version, op FROM changes WHERE position > ?1 ... LIMIT ?2`.
    pub(crate) since_sql: String,
    /// `SELECT pruned_through FROM feed`.
    pub(crate) pruned_sql: String,
    /// See [`prune_sql`].
    pub(crate) prune_sql: Arc<PruneSql>,
    /// Prunes that failed.
    pub(crate) prune_failures: Arc<Counter>,
    pub(crate) retention: Duration,
    pub(crate) poll: Duration,
    pub(crate) _keys: PhantomData<fn() -> (K, V)>,
}

impl<K: StorageKey, V: Send + Sync + 'static> Follower<K, V> {
    pub(crate) fn start(self) -> ChangeFeed<K, V> {
        let (sender, feed) = feed::channel();
        tokio::spawn(self.run(sender));
        feed
    }

    async fn run(self, sender: ChangeSender<K, V>) {
        let mut cursor = self.start;
        let mut failing = false;
        let mut own: Option<SqliteConnection> = None;
        let mut seen_version: Option<i64> = None;
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.poll) => {
                    // Another connection's commit shows in `data_version`; nothing else to do
                    // until it moves.
                    match self.data_version(&mut own).await {
                        Ok(Some(version)) if seen_version == Some(version) => continue,
                        Ok(version) => seen_version = version,
                        Err(error) => {
                            own = None;
                            if !failing {
                                tracing::warn!(tier = %self.name, %error, "change feed failing");
                                failing = true;
                                if !sender.health(FeedHealth::Down).await {
                                    return;
                                }
                            }
                            continue;
                        }
                    }
                }
                _ = prune.tick() => {
                    if let Err(error) = self.prune().await {
                        self.prune_failures.incr();
                        tracing::warn!(tier = %self.name, %error, "could not prune the change log");
                    }
                    continue;
                }
                () = sender.closed() => return,
            }
            match self.catch_up(&mut cursor, &sender).await {
                Ok(true) => {
                    if failing {
                        tracing::info!(tier = %self.name, "change feed caught up");
                        failing = false;
                        if !sender.health(FeedHealth::Following { elected: true }).await {
                            return;
                        }
                    }
                }
                Ok(false) => return,
                Err(error) => {
                    if !failing {
                        tracing::warn!(tier = %self.name, %error, "change feed failing");
                        failing = true;
                        if !sender.health(FeedHealth::Down).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// `PRAGMA data_version` on the follower's own connection (opened when missing); `None`
    /// in memory, where every tick reads the log.
    async fn data_version(
        &self,
        own: &mut Option<SqliteConnection>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        if own.is_none() {
            let conn = SqliteConnectOptions::new()
                .filename(file)
                .busy_timeout(self.busy_timeout)
                .connect()
                .await?;
            *own = Some(conn);
        }
        let conn = own.as_mut().expect("just opened");
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Some(version))
    }

    /// Reads and hands over every entry past `cursor`; `Ok(false)`: the chain is gone.
    async fn catch_up(
        &self,
        cursor: &mut i64,
        sender: &ChangeSender<K, V>,
    ) -> Result<bool, sqlx::Error> {
        loop {
            let mut conn = self.pool.acquire().await?;
            let mut tx = conn.begin().await?;
            let pruned_through: i64 = sqlx::query_scalar(AssertSqlSafe(self.pruned_sql.as_str()))
                .fetch_one(&mut *tx)
                .await?;
            let rows = sqlx::query(AssertSqlSafe(self.since_sql.as_str()))
                .bind(*cursor)
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            drop(conn);
            if *cursor < pruned_through {
                tracing::warn!(
                    tier = %self.name,
                    "the change log no longer covers what this follower missed"
                );
                let last = rows
                    .last()
                    .and_then(|r| r.try_get::<i64, _>(0).ok())
                    .unwrap_or(pruned_through);
                *cursor = last.max(pruned_through);
                if !sender.send(Scope::All, vec![Change::Everything]).await {
                    return Ok(false);
                }
                continue;
            }
            let full = rows.len() as i64 == BATCH;
            let mut batch = Vec::with_capacity(rows.len());
            for row in &rows {
                let position: i64 = row.try_get(0)?;
                let key: String = row.try_get(1)?;
                let version: i64 = row.try_get(2)?;
                let op: String = row.try_get(3)?;
                *cursor = position;
                if let (Some(key), Ok(version)) =
                    (K::from_storage_key(&key), u64::try_from(version))
                {
                    batch.push(if op == "D" {
                        Change::deleted(key, version)
                    } else {
                        Change::written(key, version)
                    });
                }
            }
            if !sender.send(Scope::All, batch).await {
                return Ok(false);
            }
            if !full {
                return Ok(true);
            }
        }
    }

    async fn prune(&self) -> Result<u64, sqlx::Error> {
        let deleted = prune(&self.pool, &self.prune_sql, self.retention).await?;
        prune_history(&self.pool, &self.prune_sql, DEFAULT_HISTORY_RETENTION).await?;
        Ok(deleted)
    }
}

/// The statements that prune a log.
pub(crate) struct PruneSql {
    /// `?1` the age (`-N seconds`): the last position older than the retention.
    through: String,
    /// `?1` that position: raises `pruned_through` to it.
    raise: String,
    /// `?1` that position, `?2` a batch size: deletes a batch of the entries up to it.
    delete: String,
    /// `?1` the history's age, `?2` a batch size: deletes a batch of older past versions.
    history: String,
}

/// The statements that prune a log: the retention's cutoff is evaluated once (a second
/// `'now'` would be a later one, and delete past what was recorded).
pub(crate) fn prune_sql(fill: impl Fn(&str) -> String) -> PruneSql {
    PruneSql {
        through: fill(
            "SELECT max(position) FROM {changes} \
             WHERE at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)",
        ),
        raise: fill("UPDATE {feed} SET pruned_through = max(pruned_through, ?1) WHERE id = 1"),
        delete: fill(
            "DELETE FROM {changes} WHERE position IN \
             (SELECT position FROM {changes} WHERE position <= ?1 ORDER BY position LIMIT ?2)",
        ),
        history: fill(
            "DELETE FROM {history} WHERE (key, version) IN \
             (SELECT key, version FROM {history} \
              WHERE at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1) LIMIT ?2)",
        ),
    }
}

/// Deletes the past versions older than `retention`, in batches of [`PRUNE_BATCH`], each in
/// an immediate transaction of its own; returns how many.
pub(crate) async fn prune_history(
    pool: &SqlitePool,
    sql: &PruneSql,
    retention: Duration,
) -> Result<u64, sqlx::Error> {
    let modifier = format!("-{:.3} seconds", retention.as_secs_f64());
    delete_in_batches(pool, &sql.history, modifier).await
}

/// Prunes the log: records how far, then deletes in batches of [`PRUNE_BATCH`], each in an
/// immediate transaction of its own (writers wait for one batch at most); returns the entries
/// deleted.
pub(crate) async fn prune(
    pool: &SqlitePool,
    sql: &PruneSql,
    retention: Duration,
) -> Result<u64, sqlx::Error> {
    let modifier = format!("-{:.3} seconds", retention.as_secs_f64());
    let through: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.through.as_str()))
        .bind(&modifier)
        .fetch_one(pool)
        .await?;
    let Some(through) = through else {
        return Ok(0);
    };
    // Recorded before anything is deleted: a follower never finds an entry gone unannounced.
    sqlx::query(AssertSqlSafe(sql.raise.as_str()))
        .bind(through)
        .execute(pool)
        .await?;
    delete_in_batches(pool, &sql.delete, through).await
}

/// Runs `delete` (parameters: `bound`, then the batch size [`PRUNE_BATCH`]) until a batch
/// deletes fewer rows than that, each batch in an immediate transaction of its own (writers
/// wait for one batch at most); returns how many rows it deleted.
async fn delete_in_batches<T>(pool: &SqlitePool, delete: &str, bound: T) -> Result<u64, sqlx::Error>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + Clone + Send + 'static,
{
    let mut deleted = 0;
    loop {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let gone = sqlx::query(AssertSqlSafe(delete))
            .bind(bound.clone())
            .bind(PRUNE_BATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        deleted += gone;
        if gone < PRUNE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}
