//! Observing the changes a chain learns of: every change it commits itself (its write path)
//! and every change it takes through the one door for remote changes (the source's feed, the
//! backplane), on one broadcast channel, for whoever keeps a copy of its own up to date (a
//! watch of a key, a stream to a client). Nothing is sent, and nothing allocated, while
//! nobody observes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::broadcast;

use super::TieredCache;
use crate::feed::Change;
use crate::tier::{Key, Value};

/// Changes an observer may fall behind by before it is told it lagged
/// ([`broadcast::error::RecvError::Lagged`]) and must read what it follows again.
pub const OBSERVER_BUFFER: usize = 4096;

/// The chain's observers: a broadcast channel made on the first subscription.
pub(super) struct Observers<K, V> {
    channel: OnceLock<broadcast::Sender<Change<K, V>>>,
    /// Whether anyone subscribed yet: one relaxed load on every change until then.
    active: AtomicBool,
}

impl<K, V> Default for Observers<K, V> {
    fn default() -> Self {
        Observers {
            channel: OnceLock::new(),
            active: AtomicBool::new(false),
        }
    }
}

impl<K: Clone, V> Observers<K, V> {
    fn subscribe(&self) -> broadcast::Receiver<Change<K, V>> {
        let sender = self
            .channel
            .get_or_init(|| broadcast::channel(OBSERVER_BUFFER).0);
        self.active.store(true, Ordering::Relaxed);
        sender.subscribe()
    }

    /// Whether a change would reach anyone (so that callers build it only then).
    pub(super) fn wanted(&self) -> bool {
        self.active.load(Ordering::Relaxed)
            && self
                .channel
                .get()
                .is_some_and(|sender| sender.receiver_count() > 0)
    }

    pub(super) fn send(&self, change: Change<K, V>) {
        if let Some(sender) = self.channel.get() {
            // No receiver left: nothing to do.
            let _ = sender.send(change);
        }
    }
}

impl<K: Key, V: Value> TieredCache<K, V> {
    /// Every change this chain learns of from now on, in the order it learns of them: its own
    /// writes and deletes as they commit (with the value written), and every remote change it
    /// applies (the source's feed, for every writer, with `psql` and other services included;
    /// the backplane), after it applied it. A change may arrive more than once (a write made
    /// here, then again from the feed; a change replayed after a handover): its version says
    /// which is new. [`Change::Everything`] and [`Change::Reset`] say every key may have
    /// changed. A receiver more than [`OBSERVER_BUFFER`] changes behind is told it lagged
    /// and must read what it follows again.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change<K, V>> {
        self.inner.observers.subscribe()
    }
}
