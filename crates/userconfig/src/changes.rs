//! Every change this instance learns of, in order, with a cursor to resume from: for services
//! that keep their own copies of many users (`GET /v1/changes` in `userconfig serve`).
//!
//! A task of the storage's own (started with the first reader) takes each change the chain
//! learns of (its own writes, the database's feed for every writer, the backplane), drops
//! repeats (a write seen from its writer and again from the feed), numbers it, and keeps the
//! last [`DEFAULT_CHANGE_LOG_ENTRIES`] in a ring. A cursor is this storage's random epoch and a
//! number: a reader that comes back with one resumes exactly after it while the ring still
//! holds what followed; otherwise (another instance's cursor, a restart, a reader that fell a
//! whole ring behind) it is told to re-sync ([`Error::CursorTooOld`]): read what it keeps
//! again, then follow from a fresh cursor. When the chain itself may have missed changes (its
//! feed lost some, the database's history reset, this log's own subscription lagged), a
//! `Resync` entry says so in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tiercache_core::{Change, Version};
use tokio::sync::{broadcast, watch};

use crate::Key;
use crate::config::UserConfig;
use crate::error::{Error, Result};

/// Changes the log keeps for readers to resume from.
pub const DEFAULT_CHANGE_LOG_ENTRIES: usize = 65_536;

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChangeOp {
    /// The user's configuration was written.
    Write,
    /// It was deleted (the user reads as the defaults).
    Delete,
    /// Changes may have been missed: read every user you keep again.
    Resync,
}

/// One change in the log.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoggedChange {
    /// Where it is: pass it back to resume after it.
    pub cursor: String,
    /// The user (empty for [`ChangeOp::Resync`]).
    pub user_id: String,
    /// The change's version (0 for [`ChangeOp::Resync`]).
    pub version: Version,
    /// What it did.
    pub op: ChangeOp,
}

struct Entry {
    seq: u64,
    user: String,
    version: Version,
    op: ChangeOp,
}

struct Ring {
    entries: VecDeque<Entry>,
    /// The last version logged per user still in the ring (repeats are dropped).
    last: HashMap<String, Version>,
    next_seq: u64,
}

/// A storage's change log (shared by its clones).
pub(crate) struct ChangeLog {
    epoch: u64,
    capacity: usize,
    ring: Mutex<Ring>,
    /// The next sequence number: readers wait for it to move.
    tail: watch::Sender<u64>,
    running: AtomicBool,
}

impl ChangeLog {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(ChangeLog {
            epoch: fastrand::u64(..) >> 12,
            capacity: capacity.max(1),
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                last: HashMap::new(),
                next_seq: 1,
            }),
            tail: watch::Sender::new(1),
            running: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cursor(&self, seq: u64) -> String {
        format!("{:x}-{seq}", self.epoch)
    }

    /// The sequence number a cursor names, if it is this log's.
    fn parse(&self, cursor: &str) -> Option<u64> {
        let (epoch, seq) = cursor.split_once('-')?;
        (u64::from_str_radix(epoch, 16).ok()? == self.epoch)
            .then(|| seq.parse().ok())
            .flatten()
    }

    fn push(&self, user: String, version: Version, op: ChangeOp) {
        let mut ring = self.lock();
        if op != ChangeOp::Resync {
            if ring.last.get(&user).is_some_and(|held| *held >= version) {
                return;
            }
            ring.last.insert(user.clone(), version);
        }
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.entries.push_back(Entry {
            seq,
            user,
            version,
            op,
        });
        while ring.entries.len() > self.capacity {
            let gone = ring.entries.pop_front().expect("over capacity");
            if ring.last.get(&gone.user) == Some(&gone.version) {
                ring.last.remove(&gone.user);
            }
        }
        let next = ring.next_seq;
        drop(ring);
        self.tail.send_replace(next);
    }

    fn take(&self, change: Change<Key, UserConfig>) {
        match change {
            Change::Key {
                key,
                version: Some(version),
                deleted,
                ..
            } => {
                let op = if deleted {
                    ChangeOp::Delete
                } else {
                    ChangeOp::Write
                };
                self.push(key, version, op);
            }
            // A manual invalidation changed nothing stored.
            Change::Key { version: None, .. } => {}
            // `Everything`, `Reset`, and what this version does not know.
            _ => self.push(String::new(), 0, ChangeOp::Resync),
        }
    }

    /// The entries after `after` (at most `max`), or `None` if the ring no longer holds the
    /// one right after it.
    fn after(&self, after: u64, max: usize) -> Option<Vec<LoggedChange>> {
        let ring = self.lock();
        let first = ring.entries.front().map_or(ring.next_seq, |e| e.seq);
        if after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
        Some(
            ring.entries
                .iter()
                .skip(skip)
                .take(max)
                .map(|e| LoggedChange {
                    cursor: self.cursor(e.seq),
                    user_id: e.user.clone(),
                    version: e.version,
                    op: e.op,
                })
                .collect(),
        )
    }
}

/// Takes the chain's changes into the log until the storage or the chain is dropped.
async fn follow(log: Weak<ChangeLog>, mut changes: broadcast::Receiver<Change<Key, UserConfig>>) {
    loop {
        let next = changes.recv().await;
        let Some(log) = log.upgrade() else { return };
        match next {
            Ok(change) => log.take(change),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                log.push(String::new(), 0, ChangeOp::Resync);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A reader of the change log, from [`UserConfigStorage::changes`](crate::UserConfigStorage::changes).
pub struct ChangeReader {
    log: Arc<ChangeLog>,
    /// The last sequence number this reader has.
    at: u64,
    tail: watch::Receiver<u64>,
    pending: VecDeque<LoggedChange>,
}

impl std::fmt::Debug for ChangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeReader")
            .field("cursor", &self.cursor())
            .finish()
    }
}

impl ChangeReader {
    /// Where the reader is: pass it to [`changes`](crate::UserConfigStorage::changes) to
    /// resume after the last change it returned.
    #[must_use]
    pub fn cursor(&self) -> String {
        self.log.cursor(self.at)
    }

    /// The next change, waiting for it. Cancel-safe.
    ///
    /// # Errors
    /// [`Error::CursorTooOld`] once the reader fell a whole log behind: re-sync, then read
    /// from a new reader.
    pub async fn next(&mut self) -> Result<LoggedChange> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                // The cursor moves only as changes are handed out (cancel-safe).
                self.at = self.log.parse(&change.cursor).unwrap_or(self.at);
                return Ok(change);
            }
            match self.log.after(self.at, 256) {
                None => return Err(Error::CursorTooOld),
                Some(found) if !found.is_empty() => self.pending.extend(found),
                Some(_) => {
                    if self.tail.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl crate::UserConfigStorage {
    /// Every change this instance learns of (its own writes, other instances', plain SQL),
    /// in the order it learns of them, none twice: each with its user, version, what it did
    /// and a cursor. `since`: a cursor an earlier reader returned, to resume right after it;
    /// `None`: from now on.
    ///
    /// # Errors
    /// [`Error::CursorTooOld`] for a cursor the log can no longer resume from (another
    /// instance's, one from before a restart, or older than the last
    /// [`DEFAULT_CHANGE_LOG_ENTRIES`] changes): read every user you keep again, then follow
    /// with `since: None`. [`Error::Settings`] outside a Tokio runtime.
    pub fn changes(&self, since: Option<&str>) -> Result<ChangeReader> {
        let log = &self.change_log;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Settings(
                "changes() reads from a task: call it inside a Tokio runtime".into(),
            ));
        }
        if !log.running.swap(true, Ordering::AcqRel) {
            let changes = self.cache.subscribe_changes();
            tokio::spawn(follow(Arc::downgrade(log), changes));
        }
        let at = match since {
            None => log.lock().next_seq - 1,
            Some(cursor) => {
                let at = log.parse(cursor).ok_or(Error::CursorTooOld)?;
                if at >= log.lock().next_seq || log.after(at, 0).is_none() {
                    return Err(Error::CursorTooOld);
                }
                at
            }
        };
        Ok(ChangeReader {
            log: Arc::clone(log),
            at,
            tail: log.tail.subscribe(),
            pending: VecDeque::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_and_the_ring_forgets_its_oldest() {
        let log = ChangeLog::new(3);
        log.push("a".into(), 5, ChangeOp::Write);
        log.push("a".into(), 5, ChangeOp::Write);
        log.push("a".into(), 4, ChangeOp::Write);
        log.push("b".into(), 6, ChangeOp::Delete);
        let all = log.after(0, 10).unwrap();
        assert_eq!(
            all.iter()
                .map(|c| (c.user_id.as_str(), c.version))
                .collect::<Vec<_>>(),
            [("a", 5), ("b", 6)]
        );
        for v in 7..=9 {
            log.push("c".into(), v, ChangeOp::Write);
        }
        assert!(log.after(0, 10).is_none(), "the first entries are gone");
        assert_eq!(log.after(2, 10).unwrap().len(), 3);
        assert_eq!(log.parse(&log.cursor(4)), Some(4));
        assert_eq!(
            log.parse(&format!("{:x}-4", log.epoch ^ 1)),
            None,
            "another epoch"
        );
        assert!(log.parse("nonsense").is_none());
    }
}
