//! The change feed: every change the source committed, by any writer, as a [`Source`] reports
//! it to the chains that follow it.
//!
//! [`Source`]: crate::Source

use tokio::sync::mpsc;

use crate::entry::Version;

/// One event of a source's change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<K> {
    /// `key` changed at `version`: written (`deleted: false`) or deleted.
    Key {
        /// The key.
        key: K,
        /// The change's version: every copy older than it is replaced.
        version: Version,
        /// Whether the change deleted the key.
        deleted: bool,
    },
    /// Every key may have changed (a `TRUNCATE`), or the follower may have missed changes (it
    /// was cut off for longer than the log keeps them): every cached copy is suspect.
    Everything,
}

/// How many batches a feed holds before its follower waits for the chain to apply them.
pub const FEED_BUFFER: usize = 64;

/// The receiving end of a source's change feed ([`Source::follow`](crate::Source::follow)):
/// batches of changes in the order the source committed them. The follower behind it stops when
/// this is dropped.
#[derive(Debug)]
pub struct ChangeFeed<K> {
    rx: mpsc::Receiver<Vec<Change<K>>>,
}

/// The sending end, held by a source's follower task.
#[derive(Debug)]
pub struct ChangeSender<K> {
    tx: mpsc::Sender<Vec<Change<K>>>,
}

impl<K> Clone for ChangeSender<K> {
    fn clone(&self) -> Self {
        ChangeSender {
            tx: self.tx.clone(),
        }
    }
}

/// A new feed: the sender for the source's follower task, the receiver for the chain.
#[must_use]
pub fn channel<K>() -> (ChangeSender<K>, ChangeFeed<K>) {
    let (tx, rx) = mpsc::channel(FEED_BUFFER);
    (ChangeSender { tx }, ChangeFeed { rx })
}

impl<K> ChangeSender<K> {
    /// Hands a batch to the chain, waiting while it is behind. `false`: the chain is gone (the
    /// follower should stop).
    pub async fn send(&self, batch: Vec<Change<K>>) -> bool {
        batch.is_empty() || self.tx.send(batch).await.is_ok()
    }

    /// Hands a batch to the chain without waiting. `false`: the chain is gone, or more than
    /// [`FEED_BUFFER`] batches behind (the batch was not handed over).
    pub fn try_send(&self, batch: Vec<Change<K>>) -> bool {
        batch.is_empty() || self.tx.try_send(batch).is_ok()
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

impl<K> ChangeFeed<K> {
    /// The next batch, or `None` once the follower stopped.
    pub async fn recv(&mut self) -> Option<Vec<Change<K>>> {
        self.rx.recv().await
    }

    /// [`recv`](Self::recv) as a poll.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Vec<Change<K>>>> {
        self.rx.poll_recv(cx)
    }
}
