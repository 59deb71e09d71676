//! Remote changes: what a chain learns from outside its own write path (the source's change
//! feed, another instance through a [`Backplane`](crate::Backplane)), and the feed a
//! [`Source`](crate::Source) hands them over in. A chain takes every one through one door,
//! [`TieredCache::apply`](crate::TieredCache::apply), with one set of rules.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use crate::entry::Version;

/// One remote change.
#[derive(PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<K, V> {
    /// `key` changed.
    #[non_exhaustive]
    Key {
        /// The key.
        key: K,
        /// The change's version: every copy older than it is stale. `None`: a manual
        /// invalidation (a change made behind every chain's back), after which whatever is
        /// held is suspect.
        version: Option<Version>,
        /// Whether the change deleted the key.
        deleted: bool,
        /// The value at `version`, when it came along: a copy held is replaced rather than
        /// dropped (a hot key stays hot).
        value: Option<Arc<V>>,
        /// The instance that applied the change to the shared tiers could not reach them:
        /// every chain replays the invalidation there itself (and reads nothing of the key
        /// from them until then), so that no instance serves the copy the change replaced.
        shared_missed: bool,
        /// When the change committed, as near as its messenger knows (the change log's time
        /// of the write): the feed's lag is measured from it.
        committed_at: Option<SystemTime>,
    },
    /// Every key may have changed (a `TRUNCATE`), or the messenger may have lost changes (a
    /// follower cut off for longer than the log keeps them): every cached copy is suspect.
    Everything,
    /// The source's history changed (a failover to a server with another history, a
    /// restore, a version counter set back): every cached copy is suspect, and so is every
    /// version the chain knows of, since the source may number its next changes below them.
    /// Like [`Change::Everything`], and the chain forgets its record of versions (marks and
    /// floors) and the invalidations still to replay (at versions of the old history).
    Reset,
}

/// Cloned without `V: Clone`: a value is shared (`Arc`), never copied.
impl<K: Clone, V> Clone for Change<K, V> {
    fn clone(&self) -> Self {
        match self {
            Change::Key {
                key,
                version,
                deleted,
                value,
                shared_missed,
                committed_at,
            } => Change::Key {
                key: key.clone(),
                version: *version,
                deleted: *deleted,
                value: value.clone(),
                shared_missed: *shared_missed,
                committed_at: *committed_at,
            },
            Change::Everything => Change::Everything,
            Change::Reset => Change::Reset,
        }
    }
}

impl<K, V> Change<K, V> {
    /// `key` was written at `version`.
    pub fn written(key: K, version: Version) -> Self {
        Change::Key {
            key,
            version: Some(version),
            deleted: false,
            value: None,
            shared_missed: false,
            committed_at: None,
        }
    }

    /// `key` was deleted at `version`.
    pub fn deleted(key: K, version: Version) -> Self {
        Change::Key {
            key,
            version: Some(version),
            deleted: true,
            value: None,
            shared_missed: false,
            committed_at: None,
        }
    }

    /// `key` was invalidated by hand: whatever is held is suspect.
    pub fn invalidated(key: K) -> Self {
        Change::Key {
            key,
            version: None,
            deleted: false,
            value: None,
            shared_missed: false,
            committed_at: None,
        }
    }

    /// What another instance announces after its own write or invalidation (see
    /// [`Backplane`](crate::Backplane)): `key` changed at `version` (`None`: invalidated by
    /// hand), with the value at that version when it came along.
    pub fn announced(key: K, version: Option<Version>, value: Option<Arc<V>>) -> Self {
        match (version, value) {
            (Some(version), Some(value)) => Change::written(key, version).with_value(value),
            (Some(version), None) => Change::written(key, version),
            (None, _) => Change::invalidated(key),
        }
    }

    /// The same change, carrying the value at its version (ignored for a delete or a manual
    /// invalidation).
    #[must_use]
    pub fn with_value(mut self, new: Arc<V>) -> Self {
        if let Change::Key {
            value,
            deleted: false,
            version: Some(_),
            ..
        } = &mut self
        {
            *value = Some(new);
        }
        self
    }

    /// The same change, stamped with when it committed.
    #[must_use]
    pub fn committed_at(mut self, at: SystemTime) -> Self {
        if let Change::Key { committed_at, .. } = &mut self {
            *committed_at = Some(at);
        }
        self
    }

    /// The same change, marked as missed by the shared tiers (see [`Change::Key`]).
    #[must_use]
    pub fn missed_by_shared_tiers(mut self) -> Self {
        if let Change::Key { shared_missed, .. } = &mut self {
            *shared_missed = true;
        }
        self
    }

    /// The key, for a change of one key.
    pub fn key(&self) -> Option<&K> {
        match self {
            Change::Key { key, .. } => Some(key),
            Change::Everything | Change::Reset => None,
        }
    }

    /// The version, for a change of a key with one.
    pub fn version(&self) -> Option<Version> {
        match self {
            Change::Key { version, .. } => *version,
            Change::Everything | Change::Reset => None,
        }
    }
}

impl<K: std::fmt::Debug, V> std::fmt::Debug for Change<K, V> {
    /// Never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Key {
                key,
                version,
                deleted,
                value,
                shared_missed,
                committed_at,
            } => f
                .debug_struct("Key")
                .field("key", key)
                .field("version", version)
                .field("deleted", deleted)
                .field("with_value", &value.is_some())
                .field("shared_missed", shared_missed)
                .field("committed_at", committed_at)
                .finish(),
            Change::Everything => f.write_str("Everything"),
            Change::Reset => f.write_str("Reset"),
        }
    }
}

/// Which cache tiers of a chain a batch of changes reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// Every cache tier: this chain is the one that applies the change to the shared tiers
    /// (Redis) for every instance, once (the follower its source elected to read the feed),
    /// or nobody else does.
    All,
    /// Only the tiers no other instance fills ([`CacheTier::is_local`](crate::CacheTier::is_local):
    /// memory): another instance applies the change to the shared tiers (the writer, or the
    /// feed's elected follower).
    Local,
}

/// Who brought a batch: counted apart in the chain's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Via {
    /// The source's change feed (directly, or relayed by the follower it elected).
    Feed,
    /// Another instance, through the backplane.
    Backplane,
}

/// A batch of changes and how far it reaches: what [`TieredCache::apply`](crate::TieredCache::apply) takes.
#[derive(Debug)]
pub struct Changes<K, V> {
    /// Which tiers the changes reach.
    pub scope: Scope,
    /// Who brought them.
    pub via: Via,
    /// The changes, in the order they committed (for one key, versions order them anyway).
    pub changes: Vec<Change<K, V>>,
}

impl<K: Clone, V> Clone for Changes<K, V> {
    fn clone(&self) -> Self {
        Changes {
            scope: self.scope,
            via: self.via,
            changes: self.changes.clone(),
        }
    }
}

impl<K, V> Changes<K, V> {
    /// A batch from the source's feed.
    #[must_use]
    pub fn from_feed(scope: Scope, changes: Vec<Change<K, V>>) -> Self {
        Changes {
            scope,
            via: Via::Feed,
            changes,
        }
    }

    /// A batch from another instance, for the local tiers.
    #[must_use]
    pub fn from_backplane(changes: Vec<Change<K, V>>) -> Self {
        Changes {
            scope: Scope::Local,
            via: Via::Backplane,
            changes,
        }
    }
}

/// How many batches a feed holds before its follower waits for the chain to apply them.
pub const FEED_BUFFER: usize = 64;

/// What a follower tells its chain besides changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedHealth {
    /// Connected and following (`elected`: this follower reads the log for every instance).
    Following {
        /// Whether this follower is the one that reads the source's log and applies its
        /// changes to the shared tiers.
        elected: bool,
    },
    /// Cut off: changes are not arriving now (they will be caught up, or flushed, later).
    Down,
}

/// What [`TieredCache::apply`](crate::TieredCache::apply) did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// For each change of the batch, in order: whether a shared tier could not take it (it is
    /// replayed there later; the instances told of it next should replay it too, see
    /// [`Change::missed_by_shared_tiers`]).
    pub shared_missed: Vec<bool>,
}

/// What a feed carries.
#[derive(Debug)]
pub(crate) enum Item<K, V> {
    /// A batch, and who waits for it to be applied.
    Changes(Changes<K, V>, Option<oneshot::Sender<Applied>>),
    Health(FeedHealth),
}

/// The receiving end of a source's change feed ([`Source::follow`](crate::Source::follow)):
/// batches of changes in the order the source committed them. The follower behind it stops when
/// this is dropped.
#[derive(Debug)]
pub struct ChangeFeed<K, V> {
    rx: mpsc::Receiver<Item<K, V>>,
}

/// The sending end, held by a source's follower task.
#[derive(Debug)]
pub struct ChangeSender<K, V> {
    tx: mpsc::Sender<Item<K, V>>,
}

impl<K, V> Clone for ChangeSender<K, V> {
    fn clone(&self) -> Self {
        ChangeSender {
            tx: self.tx.clone(),
        }
    }
}

/// A new feed: the sender for the source's follower task, the receiver for the chain.
#[must_use]
pub fn channel<K, V>() -> (ChangeSender<K, V>, ChangeFeed<K, V>) {
    let (tx, rx) = mpsc::channel(FEED_BUFFER);
    (ChangeSender { tx }, ChangeFeed { rx })
}

impl<K, V> ChangeSender<K, V> {
    /// Hands a batch to the chain, waiting while it is behind. `false`: the chain is gone (the
    /// follower should stop).
    pub async fn send(&self, scope: Scope, batch: Vec<Change<K, V>>) -> bool {
        batch.is_empty()
            || self
                .tx
                .send(Item::Changes(Changes::from_feed(scope, batch), None))
                .await
                .is_ok()
    }

    /// Hands a batch to the chain and waits until it is applied (a follower that tells other
    /// instances of a change after applying it to the shared tiers: they then never find the
    /// copy it replaced there). `None`: the chain is gone.
    pub async fn apply(&self, scope: Scope, batch: Vec<Change<K, V>>) -> Option<Applied> {
        if batch.is_empty() {
            return Some(Applied::default());
        }
        let (done, applied) = oneshot::channel();
        self.tx
            .send(Item::Changes(Changes::from_feed(scope, batch), Some(done)))
            .await
            .ok()?;
        applied.await.ok()
    }

    /// Hands a batch to the chain without waiting. `false`: the chain is gone, or more than
    /// [`FEED_BUFFER`] batches behind (the batch was not handed over).
    pub fn try_send(&self, scope: Scope, batch: Vec<Change<K, V>>) -> bool {
        batch.is_empty()
            || self
                .tx
                .try_send(Item::Changes(Changes::from_feed(scope, batch), None))
                .is_ok()
    }

    /// Tells the chain how the follower is doing (shown in its statistics and readiness).
    /// `false`: the chain is gone.
    pub async fn health(&self, health: FeedHealth) -> bool {
        self.tx.send(Item::Health(health)).await.is_ok()
    }

    /// Whether the chain is gone.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the chain is gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl<K, V> ChangeFeed<K, V> {
    /// The next batch of changes, or `None` once the follower stopped (health reports are
    /// skipped). A follower waiting for the batch to be applied is told it was, with nothing
    /// missed: whoever reads the feed this way applies it.
    pub async fn recv(&mut self) -> Option<Changes<K, V>> {
        loop {
            match self.rx.recv().await? {
                Item::Changes(changes, done) => {
                    if let Some(done) = done {
                        let _ = done.send(Applied {
                            shared_missed: vec![false; changes.changes.len()],
                        });
                    }
                    return Some(changes);
                }
                Item::Health(_) => {}
            }
        }
    }

    /// The next item, as a poll.
    pub(crate) fn poll_item(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Item<K, V>>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_rides_only_on_a_write() {
        let v = Arc::new(1u8);
        let w = Change::<&str, u8>::written("a", 3).with_value(Arc::clone(&v));
        assert!(matches!(w, Change::Key { value: Some(_), .. }));
        let d = Change::<&str, u8>::deleted("a", 3).with_value(Arc::clone(&v));
        assert!(matches!(d, Change::Key { value: None, .. }));
        let i = Change::<&str, u8>::invalidated("a").with_value(v);
        assert!(matches!(i, Change::Key { value: None, .. }));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let w = Change::<&str, &str>::written("a", 3).with_value(Arc::new("s3cret-value"));
        let printed = format!("{w:?}");
        assert!(!printed.contains("s3cret-value"), "{printed}");
        assert!(printed.contains("with_value: true"), "{printed}");
    }
}
