//! The election and the history checks: trying the advisory lock, and on election checking
//! that the saved cursor belongs to the server's history (system identifier, timeline, a version
//! counter not set back), else resetting the fleet (every tier emptied once, a reset message,
//! the counter set past the highest version seen).

use std::time::Instant;

use serde::de::DeserializeOwned;
use sqlx::postgres::PgListener;
use tiercache_core::feed::ChangeSender;
use tiercache_core::{Change, Scope, StorageKey};

use super::snapshot::Snapshot;
use super::wire::Entry;
use super::{Ended, Follower, Place, Session, db, log};

impl<K: StorageKey, V: DeserializeOwned + Send + Sync + 'static> Follower<K, V> {
    /// After a (re)connect: whether the server's history is the one this follower's cursor
    /// belongs to. Not after a failover to a server with another history, or a restore (another
    /// timeline, another system): every change it knows of may be gone, and the next ones may
    /// be numbered below what its caches hold. Every tier of its chain is flushed, the shared
    /// ones included (a failover is rare; were it to wait for the elected follower to empty
    /// them, it could copy their old entries back meanwhile), its version record forgotten,
    /// once, and it starts over from now.
    pub(super) async fn same_history(
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
    pub(super) async fn elect(
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
    pub(super) async fn reset(
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
}
