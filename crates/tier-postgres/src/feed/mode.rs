//! The elected follower's mode: streaming the WAL where the server allows it (logical
//! decoding, see `logical.rs`), else reading the log (stock mode, see `log.rs`).
//!
//! Writers follow a switch (`<table>_emit`, a sequence read as it is now, whatever the
//! writer's snapshot): on, they emit a transactional logical message (nothing else on their
//! commit path); off, they add an entry to the log. The elected follower turns it on only once
//! its stream runs (its slot exists, so nothing emitted after is lost) and off when the stream
//! cannot be had; every turn off flushes every cache of the fleet at once and once more when
//! the transactions running just after it have ended (the flush is owed in the feed row, so
//! that whoever is elected next makes it; see `log::set_logical`).

#[cfg(feature = "logical")]
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use sqlx::postgres::PgListener;
use tiercache_core::feed::ChangeSender;
use tiercache_core::{Change, Scope, StorageKey};

#[cfg(feature = "logical")]
use super::logical;
#[cfg(feature = "logical")]
use super::wire;
use super::{Ended, Follower, Place, Session, db, everything, log};

/// How soon the elected follower tries again to stream the WAL (doubling while it fails, up
/// to [`STREAM_RETRY_MAX`]).
#[cfg(feature = "logical")]
const STREAM_RETRY: Duration = Duration::from_secs(5);
#[cfg(feature = "logical")]
const STREAM_RETRY_MAX: Duration = Duration::from_secs(300);
/// How many attempts in a row may fail, while writers emit messages, before the log is the
/// feed again (about a second apart: their messages wait in the slot meanwhile).
#[cfg(feature = "logical")]
const STREAM_TRIES: u32 = 5;

/// An attempt to stream the WAL, running in a task of its own; stopped when dropped.
#[cfg(feature = "logical")]
pub(super) struct SetupTask(tokio::task::JoinHandle<logical::Setup>);

#[cfg(feature = "logical")]
impl Drop for SetupTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<K: StorageKey, V: DeserializeOwned + Send + Sync + 'static> Follower<K, V> {
    /// The elected follower's mode: streaming the WAL (logical decoding) where the server
    /// allows it, else reading the log. Tried at election and, while not streaming, again
    /// (every [`STREAM_RETRY`], doubling while it fails). The attempt runs in a task of its
    /// own (making a slot waits for every running transaction): the log is read meanwhile.
    /// While writers emit messages (the switch is on) it is turned off, and every cache
    /// flushed once, only when the stream cannot be had: the server no longer allows it, the
    /// slot is gone, or it failed [`STREAM_TRIES`] times in a row.
    pub(super) async fn choose_mode(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
    ) -> Result<(), Ended> {
        #[cfg(feature = "logical")]
        {
            if session.stream.is_some() {
                return Ok(());
            }
            if let Some(task) = session.setup.as_mut() {
                if !task.0.is_finished() {
                    return Ok(());
                }
                let outcome = match (&mut task.0).await {
                    Ok(outcome) => outcome,
                    Err(error) => logical::Setup::Failed(error.to_string()),
                };
                session.setup = None;
                return self.set_up(conn, place, session, sender, outcome).await;
            }
            if Instant::now() < session.stream_at {
                return Ok(());
            }
            let Some(settings) = &self.logical else {
                session.stream_at = Instant::now() + STREAM_RETRY;
                return self
                    .stock(
                        conn,
                        place,
                        session,
                        sender,
                        "logical decoding is off for this source",
                    )
                    .await;
            };
            let emitting = log::logical(db(conn).await?, &self.sql).await?;
            session.setup = Some(SetupTask(tokio::spawn(logical::setup(
                settings.clone(),
                emitting,
            ))));
            Ok(())
        }
        #[cfg(not(feature = "logical"))]
        {
            if session.mode.is_some() {
                return Ok(());
            }
            self.stock(
                conn,
                place,
                session,
                sender,
                "logical decoding is not built in (feature `logical`)",
            )
            .await
        }
    }

    /// What an attempt to stream the WAL came to.
    #[cfg(feature = "logical")]
    async fn set_up(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        outcome: logical::Setup,
    ) -> Result<(), Ended> {
        let backoff = |failures: u32| {
            STREAM_RETRY
                .saturating_mul(1 << failures.min(6))
                .min(STREAM_RETRY_MAX)
        };
        match outcome {
            logical::Setup::Streaming(stream) => {
                log::set_logical(db(conn).await?, &self.sql, true).await?;
                session.stream = Some(stream);
                let name = self.logical.as_ref().map_or("", |s| s.name.as_str());
                self.say_mode(session, format!("logical decoding through slot {name}"));
                Ok(())
            }
            logical::Setup::SlotGone => {
                // Made anew at the next tick, once writers write the log again.
                session.stream_at = Instant::now();
                self.stock(conn, place, session, sender, "the replication slot is gone")
                    .await
            }
            logical::Setup::Refused(why) => {
                session.stream_at = Instant::now() + backoff(session.failures);
                session.failures = session.failures.saturating_add(1);
                self.stock(conn, place, session, sender, &why).await
            }
            logical::Setup::Failed(why) => {
                session.failures = session.failures.saturating_add(1);
                let emitting = log::logical(db(conn).await?, &self.sql).await?;
                if emitting && session.failures < STREAM_TRIES {
                    // What writers emit waits in the slot: try again soon.
                    tracing::warn!(tier = %self.name, %why,
                        "change feed: could not stream the WAL; trying again");
                    session.stream_at = Instant::now() + Duration::from_secs(1);
                    return Ok(());
                }
                session.stream_at = Instant::now() + backoff(session.failures);
                self.stock(conn, place, session, sender, &why).await
            }
        }
    }

    /// The log is the feed: writers must write it, and no slot keeps WAL for nobody. If they
    /// were emitting messages instead, every cache is flushed once now (here, and told
    /// everywhere), and once more when every transaction that ran at the change has ended (one
    /// of them may have emitted its message before and commit after the flush). That second
    /// flush is owed in the feed row, with those transactions: whoever is elected makes it,
    /// should this follower's session end first.
    async fn stock(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        why: &str,
    ) -> Result<(), Ended> {
        let was = log::set_logical(db(conn).await?, &self.sql, false).await?;
        if was {
            tracing::warn!(tier = %self.name,
                "change feed: writers were emitting logical messages nobody can read now: \
                 every cache is flushed once");
            self.flush(conn, place, session, sender).await?;
        }
        if let Err(error) = log::drop_slot(db(conn).await?, &self.channel).await {
            // It keeps the server's WAL for nobody: an operator must drop it.
            tracing::warn!(tier = %self.name, %error,
                "change feed: could not drop the replication slot, which keeps WAL for nobody; \
                 have a role that may run: SELECT pg_drop_replication_slot('{}')",
                self.channel);
        }
        self.say_mode(
            session,
            format!("reads the log every {:?} (stock mode): {why}", self.poll),
        );
        Ok(())
    }

    /// Empties every cache of the fleet: here (the shared tiers too), and told to the others.
    async fn flush(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
    ) -> Result<(), Ended> {
        sender
            .apply(Scope::All, vec![Change::Everything])
            .await
            .ok_or(Ended::ChainGone)?;
        self.tell(conn, place, session, &[everything()]).await?;
        Ok(())
    }

    /// The flush owed since writers stopped emitting messages (read with the log), once every
    /// transaction that ran then has ended.
    pub(super) async fn flush_when_done(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
    ) -> Result<(), Ended> {
        let Some(xids) = session.flush_owed.take() else {
            return Ok(());
        };
        if xids == ["*"] {
            // A follower was turning the switch off and went before it recorded the
            // transactions then running: those running now include them. If the switch did
            // not turn, writers still emit to the slot and nothing is owed.
            if log::logical(db(conn).await?, &self.sql).await? {
                log::flushed(db(conn).await?, &self.sql, &xids).await?;
            } else {
                log::owe_running(db(conn).await?, &self.sql).await?;
            }
            return Ok(());
        }
        match log::still_running(db(conn).await?, &xids).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // Transaction ids this server cannot place (they came with the feed row from
            // another history): nothing of theirs runs here.
            Err(sqlx::Error::Database(error)) => {
                tracing::warn!(tier = %self.name, %error,
                    "change feed: the transactions a flush waited for are unknown here");
            }
            Err(error) => return Err(error.into()),
        }
        tracing::info!(tier = %self.name,
            "change feed: the transactions that ran when writers stopped emitting messages \
             have ended: every cache is flushed once more");
        self.flush(conn, place, session, sender).await?;
        log::flushed(db(conn).await?, &self.sql, &xids).await?;
        Ok(())
    }

    /// The WAL stream was cut: read the log meanwhile and stream again a second later (what
    /// writers emit waits in the slot); after [`STREAM_TRIES`] cuts in a row with nothing
    /// received between them, the log is the feed again.
    #[cfg(feature = "logical")]
    async fn cut(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        why: String,
    ) -> Result<(), Ended> {
        session.stream = None;
        session.failures = session.failures.saturating_add(1);
        if session.failures < STREAM_TRIES {
            tracing::warn!(tier = %self.name, %why,
                "change feed: the WAL stream was cut; reading the log meanwhile");
            session.stream_at = Instant::now() + Duration::from_secs(1);
            return Ok(());
        }
        session.stream_at = Instant::now() + STREAM_RETRY_MAX;
        let why = format!(
            "the WAL stream was cut {} times in a row ({why})",
            session.failures
        );
        self.stock(conn, place, session, sender, &why).await
    }

    /// A statement of the mode's failed (a privilege missing, say): said at warn, once, and
    /// tried again much later; the log is read meanwhile. The session goes on (ending it
    /// would only bring this follower back here at once).
    pub(super) fn mode_failed(&self, session: &mut Session, error: &dyn std::error::Error) {
        #[cfg(feature = "logical")]
        {
            session.stream_at = Instant::now() + STREAM_RETRY_MAX;
        }
        let mode = format!("could not choose between the log and the WAL stream: {error}");
        if session.mode.as_ref() != Some(&mode) {
            tracing::warn!(tier = %self.name, "change feed: {mode}");
            session.mode = Some(mode);
        }
    }

    /// Says the feed's mode at info, once (again when it changes).
    fn say_mode(&self, session: &mut Session, mode: String) {
        if session.mode.as_ref() != Some(&mode) {
            tracing::info!(tier = %self.name, "change feed: {mode}");
            session.mode = Some(mode);
        }
    }

    /// The elected follower's stream brought something: committed changes are applied here
    /// (every tier), then told to the others, then acknowledged (the slot may let go of them).
    #[cfg_attr(not(feature = "logical"), allow(clippy::unused_async))]
    pub(super) async fn streamed(
        &self,
        conn: &mut PgListener,
        place: &mut Place,
        session: &mut Session,
        sender: &ChangeSender<K, V>,
        step: StreamEvent,
    ) -> Result<(), Ended> {
        #[cfg(feature = "logical")]
        {
            match step {
                Err(why) => return self.cut(conn, place, session, sender, why).await,
                Ok(step) => {
                    // The stream works.
                    session.failures = 0;
                    if matches!(step, logical::Step::Nothing) {
                        return Ok(());
                    }
                }
            }
            let Some(stream) = session.stream.as_mut() else {
                return Ok(());
            };
            if let Err(why) = stream.drain(log::PAGE as usize).await {
                return self.cut(conn, place, session, sender, why).await;
            }
            let Some(stream) = session.stream.as_mut() else {
                return Ok(());
            };
            let (mut entries, through) = stream.ready();
            if entries.is_empty() {
                // Transactions with nothing for this table (servers before 15 send them).
                if let Some(lsn) = through {
                    stream.applied(lsn);
                }
                return Ok(());
            }
            self.counters.entries_read.add(entries.len() as u64);
            let changes = self.changes(conn, &entries).await?;
            let applied = sender
                .apply(Scope::All, changes)
                .await
                .ok_or(Ended::ChainGone)?;
            for (entry, missed) in entries.iter_mut().zip(&applied.shared_missed) {
                entry.shared_missed = *missed;
            }
            place.high_water = entries
                .iter()
                .map(|e| e.version)
                .fold(place.high_water, u64::max);
            // A key too long for a message is read back from the log by the others: a
            // streamed change is not there, so they are told to empty their local tiers.
            for entry in &mut entries {
                if entry.key.as_deref().is_some_and(|key| !wire::fits(key)) {
                    *entry = everything();
                }
            }
            self.tell(conn, place, session, &entries).await?;
            if let (Some(stream), Some(lsn)) = (session.stream.as_ref(), through) {
                stream.applied(lsn);
            }
            Ok(())
        }
        #[cfg(not(feature = "logical"))]
        {
            let _ = (conn, place, session, sender);
            match step {}
        }
    }
}

#[cfg(feature = "logical")]
pub(super) type StreamEvent = Result<logical::Step, String>;
#[cfg(not(feature = "logical"))]
pub(super) type StreamEvent = std::convert::Infallible;

/// The stream's next event, or never without a stream (cancel-safe).
pub(super) async fn next_event(session: &mut Session) -> StreamEvent {
    #[cfg(feature = "logical")]
    if let Some(stream) = session.stream.as_mut() {
        return stream.next().await;
    }
    #[cfg(not(feature = "logical"))]
    let _ = session;
    std::future::pending().await
}
