//! The change feed: a follower per chain that `LISTEN`s on the table's channel on a connection
//! of its own, catches up from the change log after every (re)connect, polls the log as a
//! safety net, and prunes it.
//!
//! **Catching up without skipping a late commit.** Log positions (and versions) are taken
//! before commit, so transactions commit out of position order: reading `position > last
//! seen` could skip a change that committed late. The follower reads by writing transaction
//! instead. Each read runs in one snapshot and keeps that snapshot's `xmin` (every transaction
//! with a lower id had ended when it was taken) as its cursor; the next read takes every entry
//! whose transaction id is at least the cursor. An entry it did not see was written by a
//! transaction still running then, whose id is at least the snapshot's `xmin`. Entries read
//! twice are applied twice, which the version rules make harmless.
//!
//! **Order of a (re)connect.** `LISTEN` first, then the catch-up read: a change that commits
//! after the read's snapshot is announced to the listener, one that committed before is in
//! the read. The first cursor is the `xmin` of a snapshot the tier takes right after its
//! migrations, before its first statement: a follower that connects after its chain has
//! read and cached (the database was slow, the follower's connection failed) still catches
//! up on every change that could have replaced what was cached.
//!
//! **Pruning.** Entries older than the retention are deleted (one instance at a time, under an
//! advisory lock) and `pruned_below` rises past the greatest transaction id deleted. A
//! follower whose cursor is below it may have lost changes: it reports
//! [`Change::Everything`] (the chain empties its tiers) instead of catching up.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use sqlx::{AssertSqlSafe, Row};
use tiercache_core::feed::{self, ChangeSender};
use tiercache_core::{Change, ChangeFeed, StorageKey};

use crate::migrate::{Migrations, Names};

/// Default time an entry stays in the change log: how long a follower may be cut off and still
/// catch up without emptying its caches.
pub const DEFAULT_CHANGE_RETENTION: Duration = Duration::from_secs(3600);
/// Default interval of the follower's catch-up read when no connection breaks: it moves the
/// cursor on (so that a reconnect has little to read) and applies any change whose
/// announcement was lost.
pub const DEFAULT_FEED_POLL: Duration = Duration::from_secs(1);
/// How often a follower prunes the log.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// First and longest wait before a follower reconnects.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// What a follower needs of its tier.
pub(crate) struct Follower<K> {
    pub(crate) migrations: Arc<Migrations>,
    /// A pool of one connection: the listening one.
    pub(crate) listening: PgPool,
    /// The tier's pool, for the catch-up reads and pruning.
    pub(crate) pool: PgPool,
    pub(crate) name: String,
    pub(crate) channel: String,
    /// `SELECT xmin, pruned_below` in the read's snapshot.
    pub(crate) horizon_sql: String,
    /// `SELECT key, version, op FROM changes WHERE txid >= $1 ORDER BY position`.
    pub(crate) since_sql: String,
    /// `SELECT key FROM changes WHERE position = $1`.
    pub(crate) key_at_sql: String,
    /// Deletes entries older than `$1` seconds and raises `pruned_below`, under an advisory
    /// lock (`$2`).
    pub(crate) prune_sql: String,
    pub(crate) lock_key: i64,
    pub(crate) retention: Duration,
    pub(crate) poll: Duration,
    pub(crate) _keys: PhantomData<fn() -> K>,
}

/// Aborts a task when dropped: the listening task lives exactly as long as its session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a session ended.
enum Ended {
    /// The chain dropped the feed: stop.
    ChainGone,
    /// The connection broke or a read failed: reconnect.
    Broken(sqlx::Error),
}

impl From<sqlx::Error> for Ended {
    fn from(error: sqlx::Error) -> Self {
        Ended::Broken(error)
    }
}

impl<K: StorageKey> Follower<K> {
    /// Starts the follower's task; it stops when the returned feed is dropped.
    pub(crate) fn start(self) -> ChangeFeed<K> {
        let (sender, feed) = feed::channel();
        tokio::spawn(self.run(sender));
        feed
    }

    async fn run(self, sender: ChangeSender<K>) {
        let mut cursor: Option<i64> = None;
        let mut failures = 0u32;
        loop {
            match self.session(&mut cursor, &sender, &mut failures).await {
                Ended::ChainGone => return,
                Ended::Broken(error) => {
                    if failures == 0 {
                        tracing::warn!(tier = %self.name, %error, "change feed cut off; reconnecting");
                    }
                    failures = failures.saturating_add(1);
                    let wait = RECONNECT
                        .0
                        .saturating_mul(1 << failures.min(6))
                        .min(RECONNECT.1);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = sender.closed() => return,
                    }
                }
            }
        }
    }

    /// One connection's life: listen, catch up, then apply announcements and poll until the
    /// connection breaks or the chain is gone.
    async fn session(
        &self,
        cursor: &mut Option<i64>,
        sender: &ChangeSender<K>,
        failures: &mut u32,
    ) -> Ended {
        // The log must exist before the first read (the tier may not have run a statement
        // yet), and the first catch-up starts where the tier's history does: before anything
        // its chain could have cached.
        match self.migrations.start().await {
            Ok(start) => {
                cursor.get_or_insert(start);
            }
            Err(error) => {
                return Ended::Broken(sqlx::Error::Protocol(format!(
                    "the migrations did not run: {error}"
                )));
            }
        }
        let mut listener = match PgListener::connect_with(&self.listening).await {
            Ok(listener) => listener,
            Err(error) => return Ended::Broken(error),
        };
        // A dead connection is reported, not silently replaced: the catch-up must follow.
        listener.eager_reconnect(false);
        if let Err(error) = listener.listen(&self.channel).await {
            return Ended::Broken(error);
        }
        if let Err(ended) = self.catch_up(cursor, sender).await {
            return ended;
        }
        if *failures > 0 {
            tracing::info!(tier = %self.name, "change feed reconnected and caught up");
            *failures = 0;
        }
        // The listener reads in a task of its own, so that a poll or a prune never cancels a
        // read half way through a message; the session ends it when it ends (the guard).
        let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
        let _listening = AbortOnDrop(tokio::spawn(async move {
            loop {
                let next = match listener.try_recv().await {
                    Ok(Some(notification)) => Ok(notification.payload().to_owned()),
                    Ok(None) => Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the listening connection was lost",
                    ))),
                    Err(error) => Err(error),
                };
                let last = next.is_err();
                if heard.send(next).is_err() || last {
                    return;
                }
            }
        }));
        let mut poll = tokio::time::interval(self.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                payload = hearing.recv() => match payload {
                    Some(Ok(payload)) => {
                        let change = match self.parse(&payload).await {
                            Ok(change) => change,
                            Err(error) => return Ended::Broken(error),
                        };
                        if let Some(change) = change
                            && !sender.send(vec![change]).await {
                                return Ended::ChainGone;
                            }
                    }
                    Some(Err(error)) => return Ended::Broken(error),
                    None => {
                        return Ended::Broken(sqlx::Error::Protocol(
                            "the listening task ended".into(),
                        ));
                    }
                },
                _ = poll.tick() => {
                    if let Err(ended) = self.catch_up(cursor, sender).await {
                        return ended;
                    }
                }
                _ = prune.tick() => {
                    if let Err(error) = self.prune().await {
                        tracing::debug!(tier = %self.name, %error, "could not prune the change log");
                    }
                }
                () = sender.closed() => return Ended::ChainGone,
            }
        }
    }

    /// Reads what committed since the cursor in one snapshot and moves the cursor to the
    /// snapshot's `xmin`. The first cursor is where the tier's history starts (before its
    /// first statement), so a follower that connects late misses nothing its chain cached.
    async fn catch_up(
        &self,
        cursor: &mut Option<i64>,
        sender: &ChangeSender<K>,
    ) -> Result<(), Ended> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let (xmin, pruned_below): (i64, i64) =
            sqlx::query_as(AssertSqlSafe(self.horizon_sql.as_str()))
                .fetch_one(&mut *tx)
                .await?;
        let batch = match *cursor {
            None => Vec::new(),
            Some(from) if from < pruned_below => {
                tracing::warn!(
                    tier = %self.name,
                    "the change log no longer covers the time this follower was cut off"
                );
                vec![Change::Everything]
            }
            Some(from) => {
                let rows = sqlx::query(AssertSqlSafe(self.since_sql.as_str()))
                    .bind(from)
                    .fetch_all(&mut *tx)
                    .await?;
                rows.iter()
                    .filter_map(|row| {
                        let key: String = row.try_get(0).ok()?;
                        let version: i64 = row.try_get(1).ok()?;
                        let op: String = row.try_get(2).ok()?;
                        change(&key, version, &op)
                    })
                    .collect()
            }
        };
        tx.commit().await?;
        if !sender.send(batch).await {
            return Err(Ended::ChainGone);
        }
        *cursor = Some(xmin);
        Ok(())
    }

    /// A notification's change: `position version op key` (the key left out when it is too
    /// long for a notification, then read from the log).
    async fn parse(&self, payload: &str) -> Result<Option<Change<K>>, sqlx::Error> {
        let mut parts = payload.splitn(4, ' ');
        let (Some(position), Some(version), Some(op), Some(key)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            tracing::debug!(tier = %self.name, "a notification that is not a change; ignored");
            return Ok(None);
        };
        let (Ok(position), Ok(version)) = (position.parse::<i64>(), version.parse::<i64>()) else {
            return Ok(None);
        };
        if key.is_empty() && op != "T" {
            let key: Option<String> = sqlx::query_scalar(AssertSqlSafe(self.key_at_sql.as_str()))
                .bind(position)
                .fetch_optional(&self.pool)
                .await?;
            // Pruned already: the poll's catch-up has (or will have) applied it.
            return Ok(key.and_then(|key| change(&key, version, op)));
        }
        Ok(change(key, version, op))
    }

    async fn prune(&self) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.prune_sql.as_str()))
            .bind(self.retention.as_secs_f64())
            .bind(self.lock_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Deletes the entries older than `$1` seconds and raises `pruned_below` past them, if it gets
/// the advisory lock `$2` (one pruner at a time); returns how many it deleted.
pub(crate) fn prune_sql(names: &Names) -> String {
    names.fill(
        "WITH locked AS (SELECT pg_try_advisory_xact_lock($2) AS ok), \
         gone AS (DELETE FROM {changes} \
           WHERE at < now() - make_interval(secs => $1) AND (SELECT ok FROM locked) \
           RETURNING txid), \
         raised AS (UPDATE {feed} SET pruned_below = \
           GREATEST(pruned_below, (SELECT max(txid) + 1 FROM gone)) \
           WHERE id = 1 AND EXISTS (SELECT 1 FROM gone)) \
         SELECT count(*) FROM gone",
    )
}

/// The advisory lock pruners of one log take.
pub(crate) fn prune_lock(changes_table: &str) -> i64 {
    i64::from_ne_bytes(crate::migrate::fnv(changes_table).to_ne_bytes())
}

/// The change a log entry describes; `None` for a key this chain's key type cannot hold.
fn change<K: StorageKey>(key: &str, version: i64, op: &str) -> Option<Change<K>> {
    if op == "T" {
        return Some(Change::Everything);
    }
    Some(Change::Key {
        key: K::from_storage_key(key)?,
        version: u64::try_from(version).ok()?,
        deleted: op == "D",
    })
}
