//! The elected follower's work: applying a page everywhere and telling the others (`NOTIFY`
//! from a short transaction that writes nothing), heartbeats, saving the cursor, and pruning the
//! log and the history.

use std::time::Instant;

use serde::de::DeserializeOwned;
use sqlx::postgres::PgListener;
use tiercache_core::feed::ChangeSender;
use tiercache_core::{Scope, StorageKey};

use super::snapshot::Snapshot;
use super::wire::Entry;
use super::{
    Ended, Follower, PRUNE_BUDGET, PRUNE_EVERY, Place, SAVE_EVERY, Session, db, log, unix_now, wire,
};

impl<K: StorageKey, V: DeserializeOwned + Send + Sync + 'static> Follower<K, V> {
    /// Tells the others of changes that do not move their cursors (the WAL stream's, a
    /// flush).
    pub(super) async fn tell(
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
    pub(super) async fn lead(
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
    pub(super) async fn housekeeping(
        &self,
        conn: &mut PgListener,
        place: &Place,
        session: &mut Session,
    ) {
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

    pub(super) async fn save(
        &self,
        conn: &mut PgListener,
        cursor: &Snapshot,
        high_water: u64,
        identity: &str,
    ) -> Result<(), sqlx::Error> {
        log::save_cursor(db(conn).await?, &self.sql, cursor, high_water, identity).await
    }

    pub(super) async fn prune(
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
    pub(super) async fn announce(
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
}
