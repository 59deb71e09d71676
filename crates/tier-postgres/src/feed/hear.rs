//! What every follower does to catch up: hearing the elected follower's messages (skipping
//! what its cursor has seen, reading the log again at a gap), and reading the log since its own
//! cursor, in pages, into changes for its chain.

use std::time::Instant;

use serde::de::DeserializeOwned;
use sqlx::postgres::PgListener;
use tiercache_core::feed::ChangeSender;
use tiercache_core::{Change, Scope, StorageKey};

use super::snapshot::Snapshot;
use super::wire::{Entry, Message};
use super::{Ended, Follower, HEARTBEAT, Place, Session, covers_pruned, db, log};

impl<K: StorageKey, V: DeserializeOwned + Send + Sync + 'static> Follower<K, V> {
    /// A message of the elected follower, heard by another.
    pub(super) async fn hear(
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
    pub(super) async fn read_log(
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
    pub(super) async fn changes(
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
