//! The change feed on PostgreSQL, off every writer's commit path.
//!
//! Writers only add an entry to the change log (a trigger): no `NOTIFY` in their
//! transactions, nothing that makes commits wait for each other. Each chain's follower holds
//! one connection of its own, on which it `LISTEN`s on the table's channel and, every
//! [`DEFAULT_ELECT_EVERY`], tries to take a session advisory lock: the follower holding it is
//! the **elected** one, for every instance of every process. It alone reads the log, every
//! [`feed_poll`](crate::PostgresSourceBuilder::feed_poll): each read returns the entries not
//! visible at its cursor (a snapshot, see `snapshot.rs`) in pages, in the read's own snapshot,
//! which becomes the cursor. It applies them to its chain's tiers, shared ones included (one
//! Redis operation per change for the whole fleet), waits until they are applied, then tells
//! the others with `NOTIFY` from a short transaction that writes nothing (see `wire.rs`),
//! which they apply to their local tiers. It saves its cursor in the feed row once a second, so
//! that the next one elected (when its session ends, the lock goes with it) resumes there:
//! nothing is lost across a handover, and changes committed while no instance ran are applied
//! when one starts.
//!
//! **A follower that was not elected** applies what the elected one tells it, after
//! skipping what its cursor has seen (each change is applied once per instance). After every
//! (re)connect it first `LISTEN`s, then reads the log since its own cursor (in pages); a
//! message that does not follow on from what it has (a gap) makes it read the log again. If no
//! elected follower is heard from for [`LEADER_SILENCE`] (its session is stuck, say), each
//! follower reads the log itself and applies it everywhere until one is heard again.
//!
//! **Pruning** (the elected follower, once a minute): entries visible at the cursor it held a
//! whole retention ago are deleted in batches, after recording that cursor as pruned. A
//! follower whose cursor does not cover it (cut off for longer than the retention) may have
//! lost changes, and reports [`Change::Everything`] instead of reading on.
//!
//! **Where the server allows logical decoding** the elected follower streams the WAL through
//! a replication slot instead, and writers emit a logical message rather than a log entry
//! (`mode.rs` chooses, `logical.rs` streams); the others hear of the changes the same way.

mod log;
#[cfg(feature = "logical")]
mod logical;
mod mode;
mod snapshot;
mod wire;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tiercache_core::feed::ChangeSender;
use tiercache_core::{Change, ChangeFeed, Counter, FeedHealth, Scope, StorageKey};

pub(crate) use self::log::{Statements, prunable, prune, state};

#[cfg(feature = "logical")]
use self::mode::SetupTask;
use self::mode::next_event;
use self::snapshot::Snapshot;
use self::wire::{Entry, Message};
use crate::error::READ_ONLY_SQL_TRANSACTION;
use crate::migrate::Migrations;

/// Default time an entry stays in the change log: how long a follower may be cut off and still
/// catch up without emptying its caches.
pub const DEFAULT_CHANGE_RETENTION: Duration = Duration::from_secs(3600);
/// Default time a past version stays in the history (30 days).
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default interval at which the elected follower reads the log: the longest a change made
/// with plain SQL waits before it is applied (a change made through a chain is applied by its
/// own write path at once).
pub const DEFAULT_FEED_POLL: Duration = Duration::from_millis(10);
/// How often a follower that is not elected tries to be.
pub const DEFAULT_ELECT_EVERY: Duration = Duration::from_millis(500);
/// How long the others wait without a word from the elected follower before each reads the
/// log itself.
pub(crate) const LEADER_SILENCE: Duration = Duration::from_secs(6);
/// How often the elected follower speaks when nothing changed (others know it is alive, and
/// their cursors keep up: well within the retention, so that pruning never passes them): two
/// seconds, or an eighth of a shorter retention.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often the elected follower saves its cursor.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the elected follower records its cursor in the history and prunes: a minute, or a
/// quarter of a shorter retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The longest one prune runs.
const PRUNE_BUDGET: Duration = Duration::from_secs(1);
/// First and longest wait before a follower reconnects.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// The feed's counters, shared by the source and its followers.
#[derive(Default)]
pub(crate) struct FeedCounters {
    pub(crate) reads: Counter,
    pub(crate) entries_read: Counter,
    pub(crate) announced: Counter,
    pub(crate) pruned: Counter,
    /// Past versions pruned from the history (older than its retention).
    pub(crate) history_pruned: Counter,
    pub(crate) prune_failures: Counter,
    pub(crate) gaps: Counter,
    pub(crate) elections: Counter,
    pub(crate) resets: Counter,
}

/// What a follower needs of its source.
pub(crate) struct Follower<K, V> {
    pub(crate) migrations: Arc<Migrations>,
    /// For the follower's own connection.
    pub(crate) options: PgConnectOptions,
    pub(crate) connect_timeout: Duration,
    pub(crate) name: String,
    pub(crate) channel: String,
    /// The advisory lock the elected follower holds.
    pub(crate) lock_key: i64,
    pub(crate) sql: Arc<Statements>,
    pub(crate) retention: Duration,
    /// How long past versions stay in the history.
    pub(crate) history_retention: Duration,
    pub(crate) poll: Duration,
    pub(crate) elect_every: Duration,
    pub(crate) counters: Arc<FeedCounters>,
    /// How to stream the WAL (logical decoding), where the server allows it.
    #[cfg(feature = "logical")]
    pub(crate) logical: Option<logical::Settings>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

#[cfg(feature = "logical")]
pub(crate) use logical::Settings as LogicalSettings;

/// Why a session ended.
enum Ended {
    /// The chain dropped the feed: stop.
    ChainGone,
    /// The connection broke or a statement failed: reconnect.
    Broken(sqlx::Error),
    /// The server is a standby (in recovery): it cannot be followed (no `LISTEN`, no log
    /// written there); try again much later, in case it is promoted.
    Standby,
}

impl From<sqlx::Error> for Ended {
    fn from(error: sqlx::Error) -> Self {
        Ended::Broken(error)
    }
}

/// A follower's place in the feed, kept across its sessions.
struct Place {
    /// Every change visible here has been applied to this chain.
    cursor: Option<Snapshot>,
    /// This follower's id in the messages.
    me: u64,
    /// The server history the cursor belongs to (`system identifier:timeline`).
    identity: Option<String>,
    /// The highest version seen in the log (the version counter never goes below it unless
    /// the history changed).
    high_water: u64,
    /// The history this follower last flushed its chain for (it does not flush twice for one).
    reset_for: Option<String>,
}

/// A session's state besides the connection.
struct Session {
    elected: bool,
    /// When the elected follower (this one, or another) was last heard of.
    heard: Instant,
    /// Whether the next message is the first since the last read of the log (it cannot leave
    /// a gap: see `accept`).
    fresh: bool,
    /// A batch whose parts are arriving: its end cursor.
    partial: Option<Snapshot>,
    /// The last attempt to be elected (`None`: none yet this session).
    last_elect: Option<Instant>,
    last_spoke: Instant,
    /// Where the elected follower's last message ended: the next one starts there, so that
    /// the messages make one unbroken chain (reads that found nothing are folded into the next
    /// message).
    announced: Option<Snapshot>,
    last_saved: Instant,
    saved: Option<Snapshot>,
    last_pruned_at: Instant,
    history: Vec<(u64, Snapshot)>,
    pruned_through: Option<Snapshot>,
    degraded: bool,
    /// The elected follower's stream of the WAL (logical decoding), while it runs.
    #[cfg(feature = "logical")]
    stream: Option<logical::Stream>,
    /// When to try to stream again.
    #[cfg(feature = "logical")]
    stream_at: Instant,
    /// An attempt to stream that runs.
    #[cfg(feature = "logical")]
    setup: Option<SetupTask>,
    /// Attempts that failed in a row.
    #[cfg(feature = "logical")]
    failures: u32,
    /// The elected follower's last read of the feed row: a flush is owed once these
    /// transactions have ended (writers stopped emitting messages while they ran).
    flush_owed: Option<Vec<String>>,
    /// The mode last said at info (said again when it changes).
    mode: Option<String>,
}

impl<K: StorageKey, V: DeserializeOwned + Send + Sync + 'static> Follower<K, V> {
    /// Starts the follower's task; it stops when the returned feed is dropped.
    pub(crate) fn start(self) -> ChangeFeed<K, V> {
        let (sender, feed) = tiercache_core::feed::channel();
        tokio::spawn(self.run(sender));
        feed
    }

    async fn run(self, sender: ChangeSender<K, V>) {
        let mut place = Place {
            cursor: None,
            me: random_id(),
            identity: None,
            high_water: 0,
            reset_for: None,
        };
        let mut failures = 0u32;
        // Not following until the first session has caught up.
        if !sender.health(FeedHealth::Down).await {
            return;
        }
        loop {
            let ended = self.session(&mut place, &sender, &mut failures).await;
            if !sender.health(FeedHealth::Down).await {
                return;
            }
            let (error, standby) = match ended {
                Ended::ChainGone => return,
                Ended::Standby => (None, true),
                Ended::Broken(error) => {
                    let standby = matches!(&error, sqlx::Error::Database(db)
                        if db.code().as_deref() == Some(READ_ONLY_SQL_TRANSACTION));
                    (Some(error), standby)
                }
            };
            if standby {
                // Said every time (every 30 s): it needs an operator.
                tracing::error!(tier = %self.name,
                    "change feed: the database is a standby in recovery, which can be neither \
                     written nor followed; point the database URL at the primary");
            } else if failures == 0
                && let Some(error) = &error
            {
                tracing::warn!(tier = %self.name, %error, "change feed cut off; reconnecting");
            }
            failures = failures.saturating_add(1);
            let wait = if standby {
                Duration::from_secs(30)
            } else {
                RECONNECT
                    .0
                    .saturating_mul(1 << failures.min(6))
                    .min(RECONNECT.1)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = sender.closed() => return,
            }
        }
    }

    /// One connection's life.
    async fn session(
        &self,
        place: &mut Place,
        sender: &ChangeSender<K, V>,
        failures: &mut u32,
    ) -> Ended {
        // The log must exist before the first read, and the first cursor is where the
        // source's history starts: before anything its chain could have cached.
        match self.migrations.start().await {
            Ok(start) => {
                if place.cursor.is_none() {
                    place.cursor = Snapshot::parse(&start);
                }
            }
            Err(error) => {
                return Ended::Broken(sqlx::Error::Protocol(format!(
                    "the migrations did not run: {error}"
                )));
            }
        }
        // A pool of one connection per session, closed with it: the session's advisory lock
        // must go with the session, never back to a pool.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout.max(Duration::from_secs(1)))
            .connect_lazy_with(self.options.clone().options([
                // A client that vanished (a partition) gives up the lock within ~25 s.
                ("tcp_keepalives_idle", "10"),
                ("tcp_keepalives_interval", "5"),
                ("tcp_keepalives_count", "3"),
            ]));
        let ended = self.run_session(&pool, place, sender, failures).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
        ended
    }

    async fn run_session(
        &self,
        pool: &sqlx::PgPool,
        place: &mut Place,
        sender: &ChangeSender<K, V>,
        failures: &mut u32,
    ) -> Ended {
        let mut conn = match PgListener::connect_with(pool).await {
            Ok(listener) => listener,
            Err(error) => return Ended::Broken(error),
        };
        // A dead connection is reported, not silently replaced: the session ends with it.
        conn.eager_reconnect(false);
        // A standby is said so, clearly, rather than failed at `LISTEN`.
        let (identity, standby) = match log::identity(
            match db(&mut conn).await {
                Ok(c) => c,
                Err(error) => return Ended::Broken(error),
            },
            &self.sql,
        )
        .await
        {
            Ok(found) => found,
            Err(error) => return Ended::Broken(error),
        };
        if standby {
            return Ended::Standby;
        }
        if let Err(error) = conn.listen(&self.channel).await {
            return Ended::Broken(error);
        }
        if let Err(ended) = self.same_history(&mut conn, place, sender, identity).await {
            return ended;
        }
        let now = Instant::now();
        let mut session = Session {
            elected: false,
            heard: now,
            fresh: true,
            partial: None,
            last_elect: None,
            last_spoke: now,
            announced: None,
            last_saved: now,
            saved: None,
            last_pruned_at: now,
            history: Vec::new(),
            pruned_through: None,
            degraded: false,
            #[cfg(feature = "logical")]
            stream: None,
            #[cfg(feature = "logical")]
            stream_at: now,
            #[cfg(feature = "logical")]
            setup: None,
            #[cfg(feature = "logical")]
            failures: 0,
            flush_owed: None,
            mode: None,
        };
        // Elected now, or catch up with what this follower missed (the elected one applied it
        // to the shared tiers).
        if let Err(ended) = self.elect(&mut conn, place, &mut session, sender).await {
            return ended;
        }
        if !session.elected
            && let Err(ended) = self
                .read_log(&mut conn, place, sender, Scope::Local, None)
                .await
        {
            return ended;
        }
        if *failures > 0 {
            tracing::info!(tier = %self.name, "change feed reconnected and caught up");
            *failures = 0;
        }
        if !sender
            .health(FeedHealth::Following {
                elected: session.elected,
            })
            .await
        {
            return Ended::ChainGone;
        }
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Cancel-safe (sqlx 0.9 reads a whole message or none).
                message = conn.try_recv() => match message {
                    Ok(Some(notification)) => {
                        if session.elected {
                            continue;
                        }
                        let Some(message) = wire::decode(notification.payload()) else {
                            continue;
                        };
                        if message.sender() == place.me {
                            continue;
                        }
                        session.heard = Instant::now();
                        if session.degraded {
                            tracing::info!(tier = %self.name, "change feed: the elected follower is heard again");
                            session.degraded = false;
                        }
                        if let Err(ended) =
                            self.hear(&mut conn, place, &mut session, sender, message).await
                        {
                            return ended;
                        }
                    }
                    Ok(None) => {
                        return Ended::Broken(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the feed's connection was lost",
                        )));
                    }
                    Err(error) => return Ended::Broken(error),
                },
                step = next_event(&mut session) => {
                    if let Err(ended) = self.streamed(&mut conn, place, &mut session, sender, step).await {
                        return ended;
                    }
                }
                _ = tick.tick() => {
                    let was = session.elected;
                    if let Err(ended) = self.elect(&mut conn, place, &mut session, sender).await {
                        return ended;
                    }
                    if session.elected != was
                        && !sender.health(FeedHealth::Following { elected: true }).await
                    {
                        return Ended::ChainGone;
                    }
                    let result = if session.elected {
                        match self.choose_mode(&mut conn, place, &mut session, sender).await {
                            Ok(()) => self.lead(&mut conn, place, &mut session, sender).await,
                            Err(Ended::Broken(sqlx::Error::Database(error))) => {
                                self.mode_failed(&mut session, &*error);
                                self.lead(&mut conn, place, &mut session, sender).await
                            }
                            Err(ended) => Err(ended),
                        }
                    } else if session.heard.elapsed() > LEADER_SILENCE {
                        if !session.degraded {
                            tracing::warn!(tier = %self.name,
                                "change feed: no elected follower heard; reading the log here");
                            session.degraded = true;
                        }
                        self.read_log(&mut conn, place, sender, Scope::All, None).await
                    } else {
                        Ok(())
                    };
                    if let Err(ended) = result {
                        return ended;
                    }
                }
                () = sender.closed() => return Ended::ChainGone,
            }
        }
    }

    /// After a (re)connect: whether the server's history is the one this follower's cursor
    /// belongs to. Not after a failover to a server with another history, or a restore (another
    /// timeline, another system): every change it knows of may be gone, and the next ones may
    /// be numbered below what its caches hold. Every tier of its chain is flushed, the shared
    /// ones included (a failover is rare; were it to wait for the elected follower to empty
    /// them, it could copy their old entries back meanwhile), its version record forgotten,
    /// once, and it starts over from now.
    async fn same_history(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        sender: &ChangeSender<K, V>,
        identity: String,
    ) -> Result<(), Ended> {
        if place
            .identity
            .as_ref()
            .is_some_and(|known| *known != identity)
        {
            tracing::warn!(tier = %self.name,
                "the database's history changed (a failover or a restore): flushing once");
            sender
                .apply(Scope::All, vec![Change::Reset])
                .await
                .ok_or(Ended::ChainGone)?;
            let state = log::state(db(conn).await?, &self.sql).await?;
            place.cursor = Some(state.now);
            place.high_water = 0;
            place.reset_for = Some(identity.clone());
        }
        place.identity = Some(identity);
        Ok(())
    }

    /// Tries to be the elected follower (at most every `elect_every`); on success, resumes
    /// from where the last one got to.
    async fn elect(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
    ) -> Result<(), Ended> {
        if session.elected
            || session
                .last_elect
                .is_some_and(|at| at.elapsed() < self.elect_every)
        {
            return Ok(());
        }
        session.last_elect = Some(Instant::now());
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.lock_key)
            .fetch_one(&mut *conn)
            .await?;
        if !won {
            return Ok(());
        }
        let state = log::state(db(conn).await?, &self.sql).await?;
        self.counters.elections.incr();
        tracing::info!(tier = %self.name, "change feed: this follower is elected to read the log");
        let identity = place
            .identity
            .clone()
            .expect("known before the first election");
        let high_water = state.high_water.max(place.high_water);
        // The last elected follower's place belongs to another history (a failover, a
        // restore: another system or timeline, transaction ids or versions behind it): the
        // caches may hold what the server no longer has, and versions it will hand out again.
        let moved = state
            .identity
            .as_ref()
            .is_some_and(|known| *known != identity)
            || state
                .cursor
                .as_ref()
                .is_some_and(|c| c.xmax() > state.now.xmax())
            || high_water > state.last_version;
        session.elected = true;
        if moved && place.reset_for.as_ref() == Some(&identity) {
            // This follower flushed its chain, shared tiers included, for this very change of
            // history when it reconnected: the others do the same for themselves. The last
            // elected follower's place belongs to the old history: start from here.
            place.high_water = place.high_water.max(state.last_version);
            session.announced = place.cursor.clone();
        } else if moved {
            self.reset(conn, place, session, sender, high_water, state.now)
                .await?;
            place.reset_for = Some(identity);
        } else {
            // Resume where the last elected follower got to: what it read after that, it may
            // not have applied to the shared tiers. Without one, from this follower's own
            // cursor.
            if let Some(resume) = state.cursor {
                if place
                    .cursor
                    .as_ref()
                    .is_some_and(|own| !own.covers(&resume))
                {
                    // The last elected follower applied, and told, what this one's local tiers
                    // never saw (it was away): they catch up from its own cursor first.
                    self.read_log(conn, place, sender, Scope::Local, None)
                        .await?;
                }
                place.cursor = Some(resume);
            }
            place.high_water = high_water;
        }
        session.announced = place.cursor.clone();
        session.saved = place.cursor.clone();
        session.history = state.history;
        session.last_pruned_at = Instant::now();
        Ok(())
    }

    /// The source's history changed under the elected follower: every cache tier is emptied
    /// once, here and (told) everywhere, every version known is forgotten, the version counter
    /// is set past what caches may still hold (if this role may), and the cursor starts from
    /// `now`.
    async fn reset(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        high_water: u64,
        now: Snapshot,
    ) -> Result<(), Ended> {
        tracing::warn!(tier = %self.name,
            "the database's history changed (a failover, a restore, versions set back): \
             every cache is flushed once");
        self.counters.resets.incr();
        sender
            .apply(Scope::All, vec![Change::Reset])
            .await
            .ok_or(Ended::ChainGone)?;
        if let Err(error) = log::raise_versions(db(conn).await?, &self.sql, high_water + 1).await {
            tracing::warn!(tier = %self.name, %error,
                "could not set the version counter past the versions caches may hold \
                 (the role may lack UPDATE on it): flushed caches only");
        }
        let from = session.announced.clone().unwrap_or_else(|| now.clone());
        let reset = Entry {
            txid: u64::MAX,
            version: 0,
            op: b'X',
            shared_missed: false,
            at_ms: 0,
            key: Some(String::new()),
        };
        self.announce(conn, place.me, &from, &now, &[reset]).await?;
        session.announced = Some(now.clone());
        place.cursor = Some(now);
        place.high_water = high_water;
        Ok(())
    }

    /// Tells the others of changes that do not move their cursors (the WAL stream's, a
    /// flush).
    async fn tell(
        &self,
        conn: &mut PgListener,
        place: &Place,
        session: &mut Session,
        entries: &[Entry],
    ) -> Result<(), sqlx::Error> {
        let at = session
            .announced
            .clone()
            .or_else(|| place.cursor.clone())
            .expect("set before the first session");
        self.announce(conn, place.me, &at, &at, entries).await?;
        session.announced = Some(at);
        session.last_spoke = Instant::now();
        Ok(())
    }

    /// The elected follower's round: read what committed since the cursor, apply it here (the
    /// shared tiers included), tell the others, save the cursor now and then, prune.
    async fn lead(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
    ) -> Result<(), Ended> {
        self.read_log(conn, place, sender, Scope::All, Some(&mut *session))
            .await?;
        self.flush_when_done(conn, place, session, sender).await?;
        self.housekeeping(conn, place, session).await;
        Ok(())
    }

    /// Saves the cursor (once a second), records it in the history and prunes (once a
    /// minute). Failures are warnings and counters: the feed goes on.
    async fn housekeeping(&self, conn: &mut PgListener, place: &Place, session: &mut Session) {
        let cursor = place.cursor.clone().expect("set");
        if session.saved.as_ref() != Some(&cursor) && session.last_saved.elapsed() >= SAVE_EVERY {
            let identity = place.identity.clone().unwrap_or_default();
            match self.save(conn, &cursor, place.high_water, &identity).await {
                Ok(()) => {
                    session.saved = Some(cursor.clone());
                    session.last_saved = Instant::now();
                }
                Err(error) => {
                    tracing::warn!(tier = %self.name, %error, "change feed: could not save the cursor");
                }
            }
        }
        if session.last_pruned_at.elapsed() < (self.retention / 4).min(PRUNE_EVERY) {
            return;
        }
        session.last_pruned_at = Instant::now();
        let now = unix_now();
        if let Err(error) = self.prune(conn, session, now, cursor).await {
            self.counters.prune_failures.incr();
            tracing::warn!(tier = %self.name, %error, "change feed: could not prune the log");
        }
        match async {
            log::prune_history(
                db(conn).await?,
                &self.sql,
                self.history_retention,
                PRUNE_BUDGET,
            )
            .await
        }
        .await
        {
            Ok(deleted) => {
                self.counters.history_pruned.add(deleted);
            }
            Err(error) => {
                self.counters.prune_failures.incr();
                tracing::warn!(tier = %self.name, %error, "could not prune the history");
            }
        }
    }

    async fn save(
        &self,
        conn: &mut PgListener,
        cursor: &Snapshot,
        high_water: u64,
        identity: &str,
    ) -> Result<(), sqlx::Error> {
        log::save_cursor(db(conn).await?, &self.sql, cursor, high_water, identity).await
    }

    async fn prune(
        &self,
        conn: &mut PgListener,
        session: &mut Session,
        now: u64,
        cursor: Snapshot,
    ) -> Result<(), sqlx::Error> {
        let history = std::mem::take(&mut session.history);
        session.history = log::record_history(
            db(conn).await?,
            &self.sql,
            history,
            now,
            cursor,
            self.retention,
        )
        .await?;
        let Some(through) = log::prunable(&session.history, now, self.retention).cloned() else {
            return Ok(());
        };
        if session.pruned_through.as_ref() == Some(&through) {
            return Ok(());
        }
        let deleted = log::prune(db(conn).await?, &self.sql, &through, PRUNE_BUDGET).await?;
        self.counters.pruned.add(deleted);
        tracing::debug!(tier = %self.name, deleted, "change log pruned");
        session.pruned_through = Some(through);
        Ok(())
    }

    /// Tells the other followers of a batch: `NOTIFY`, in one short transaction that writes
    /// nothing, so its commit waits for no disk and holds the instance's notification lock
    /// only for a moment.
    async fn announce(
        &self,
        conn: &mut PgListener,
        me: u64,
        from: &Snapshot,
        to: &Snapshot,
        entries: &[Entry],
    ) -> Result<(), sqlx::Error> {
        let payloads = wire::encode(me, from, to, entries);
        sqlx::query(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n",
        )
        .bind(&self.channel)
        .bind(&payloads)
        .execute(db(conn).await?)
        .await?;
        self.counters.announced.add(payloads.len() as u64);
        Ok(())
    }

    /// A message of the elected follower, heard by another.
    async fn hear(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        message: Message,
    ) -> Result<(), Ended> {
        let Message::Batch {
            part,
            parts,
            from,
            to,
            entries,
            ..
        } = message
        else {
            // Too large to describe: read the log.
            self.counters.gaps.incr();
            session.fresh = true;
            return self.read_log(conn, place, sender, Scope::Local, None).await;
        };
        let cursor = place.cursor.clone().expect("set before the first session");
        if part == 1 {
            // The first message since this follower last read the log follows on from it: a
            // batch it did not hear ended after it began listening, so it was in that read.
            let follows = session.fresh || cursor.covers(&from);
            session.fresh = false;
            if !follows {
                self.counters.gaps.incr();
                tracing::debug!(tier = %self.name, "change feed: a gap; reading the log");
                session.partial = None;
                session.fresh = true;
                return self.read_log(conn, place, sender, Scope::Local, None).await;
            }
            session.partial = Some(to.clone());
        } else if session.partial.as_ref() != Some(&to) {
            // A part of a batch whose start was not heard: nothing else arrives that way.
            self.counters.gaps.incr();
            session.fresh = true;
            return self.read_log(conn, place, sender, Scope::Local, None).await;
        }
        // What this follower's cursor has seen was applied already (by a read of the log).
        let fresh: Vec<Entry> = entries
            .into_iter()
            .filter(|e| !cursor.sees(e.txid))
            .collect();
        let changes = self.changes(conn, &fresh).await?;
        if !sender.send(Scope::Local, changes).await {
            return Err(Ended::ChainGone);
        }
        if part == parts {
            session.partial = None;
            // Everything the batch's start covered was applied (it followed on), and so is
            // the batch: its end is the cursor, even when this follower's own was taken a
            // moment later (two snapshots taken at about the same time may each see a commit
            // the other does not: the next batch would not follow on from the later of them).
            // The worst it costs is a change applied twice.
            place.cursor = Some(to);
        }
        Ok(())
    }

    /// Reads what committed since this follower's cursor, in pages, applies it (`scope`: its
    /// local tiers, or all of them when it is the elected follower or no elected follower is
    /// heard), waits until it is applied, then moves the cursor. The elected follower
    /// (`leading`) tells the others of each page once it is applied.
    async fn read_log(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        sender: &ChangeSender<K, V>,
        scope: Scope,
        mut leading: Option<&mut Session>,
    ) -> Result<(), Ended> {
        let from = place.cursor.clone().expect("set before the first session");
        let mut target: Option<Snapshot> = None;
        let mut after = (0, 0);
        loop {
            let read = log::page(db(conn).await?, &self.sql, &from, target.as_ref(), after).await?;
            self.counters.reads.incr();
            if target.is_none() && !covers_pruned(&from, read.pruned.as_ref()) {
                // Cut off (or, elected, resumed where the last one stopped) for longer than the
                // log keeps changes: what was missed cannot be known.
                tracing::warn!(tier = %self.name,
                    "the change log no longer covers what this follower has not seen");
                sender
                    .apply(scope, vec![Change::Everything])
                    .await
                    .ok_or(Ended::ChainGone)?;
                place.cursor = Some(read.seen);
                return Ok(());
            }
            if let Some(session) = leading.as_deref_mut()
                && target.is_none()
                && read.last_version < place.high_water
            {
                // The version counter was set back behind every cache's back.
                let now = read.seen.clone();
                return self
                    .reset(conn, place, session, sender, place.high_water, now)
                    .await;
            }
            if target.is_none()
                && let Some(session) = leading.as_deref_mut()
            {
                session.flush_owed = read.flush_owed.clone();
            }
            let streamed_since = read.logical
                || read.flush_owed.is_some()
                || read
                    .stream_off
                    .as_ref()
                    .is_some_and(|off| !from.covers(off));
            if leading.is_none() && scope == Scope::Local && target.is_none() && streamed_since {
                // Writers emit (or emitted, since this follower's cursor) their changes to the
                // elected follower's WAL stream, not to the log: what this follower missed (it
                // was away, or did not hear a message) cannot be read back. Its local tiers
                // go. (Not when it reads the log because no elected follower is heard: it
                // missed nothing, and the messages wait in the slot for the next one
                // elected.)
                tracing::info!(tier = %self.name,
                    "change feed: caught up in logical decoding mode; emptying the local tiers");
                sender
                    .apply(scope, vec![Change::Everything])
                    .await
                    .ok_or(Ended::ChainGone)?;
            }
            let seen = target.clone().unwrap_or_else(|| read.seen.clone());
            if let Some(last) = read.entries.last() {
                after = (last.txid, last.version);
            }
            place.high_water = read
                .entries
                .iter()
                .map(|e| e.version)
                .fold(place.high_water, u64::max);
            let more = read.more;
            let mut entries = read.entries;
            self.counters.entries_read.add(entries.len() as u64);
            let changes = self.changes(conn, &entries).await?;
            let applied = sender.apply(scope, changes).await.ok_or(Ended::ChainGone)?;
            if let Some(session) = leading.as_deref_mut() {
                for (entry, missed) in entries.iter_mut().zip(&applied.shared_missed) {
                    entry.shared_missed = *missed;
                }
                let spoke_recently =
                    session.last_spoke.elapsed() < (self.retention / 8).min(HEARTBEAT);
                if !entries.is_empty() || !spoke_recently {
                    // A read of several pages moves the others' cursors at its last page only.
                    let start = session.announced.clone().unwrap_or_else(|| from.clone());
                    let to = if more { start.clone() } else { seen.clone() };
                    self.announce(conn, place.me, &start, &to, &entries).await?;
                    session.announced = Some(to);
                    session.last_spoke = Instant::now();
                }
            }
            if !more {
                place.cursor = Some(seen);
                return Ok(());
            }
            // The next page is of the same read.
            target = Some(seen);
        }
    }

    /// The chain's changes for log entries (a key too long for a message is read from the
    /// log; one this chain's key type cannot hold is skipped).
    async fn changes(
        &self,
        conn: &mut PgListener,
        entries: &[Entry],
    ) -> Result<Vec<Change<K, V>>, sqlx::Error> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.op == b'T' {
                out.push(Change::Everything);
                continue;
            }
            if entry.op == b'X' {
                out.push(Change::Reset);
                continue;
            }
            let key = match &entry.key {
                Some(key) => Some(key.clone()),
                None => log::key_of(db(conn).await?, &self.sql, entry.txid, entry.version).await?,
            };
            let Some(key) = key.as_deref().and_then(K::from_storage_key) else {
                continue;
            };
            let mut change = if entry.op == b'D' {
                Change::deleted(key, entry.version)
            } else {
                Change::written(key, entry.version)
            };
            if entry.shared_missed {
                change = change.missed_by_shared_tiers();
            }
            if let Some(at) = entry.committed_at() {
                change = change.committed_at(at);
            }
            out.push(change);
        }
        Ok(out)
    }
}

/// What the elected follower's stream of the WAL brought (nothing ever, without one).
/// The connection under a listener, for a statement.
async fn db(listener: &mut PgListener) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
    use sqlx::Acquire;
    listener.acquire().await
}

/// An entry that tells the others to empty their local tiers (like a `TRUNCATE`).
fn everything() -> Entry {
    Entry {
        txid: u64::MAX,
        version: 0,
        op: b'T',
        shared_missed: false,
        at_ms: 0,
        key: Some(String::new()),
    }
}

/// Whether a follower at `cursor` has seen every entry pruning removed.
fn covers_pruned(cursor: &Snapshot, pruned: Option<&Snapshot>) -> bool {
    pruned.is_none_or(|pruned| cursor.covers(pruned))
}

/// The advisory lock of a change log's elected follower.
pub(crate) fn lead_lock(changes_table: &str) -> i64 {
    i64::from_ne_bytes(crate::migrate::fnv(&format!("lead:{changes_table}")).to_ne_bytes())
}

/// Milliseconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A follower's id in its messages: random enough that two never share one.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
