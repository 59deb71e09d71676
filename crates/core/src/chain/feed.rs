//! Following the source's change feed: a task of the chain's own takes every batch the source's
//! follower hands over through the one door (`remote.rs`), and records how the follower is
//! doing (connected or not, elected or not) for the statistics.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use tokio::sync::oneshot;

use super::WeakTieredCache;
use crate::feed::{ChangeFeed, FeedHealth, Item};
use crate::tier::{Key, Value};

/// The follower's last report, for the statistics: 0 none (no feed), 1 down, 2 following, 3
/// following and elected.
#[derive(Default)]
pub(super) struct Health(AtomicU8);

impl Health {
    fn set(&self, health: FeedHealth) {
        let code = match health {
            FeedHealth::Down => 1,
            FeedHealth::Following { elected: false } => 2,
            FeedHealth::Following { elected: true } => 3,
        };
        self.0.store(code, Ordering::Relaxed);
    }

    /// `None` without a feed; else whether it is connected, and whether elected.
    pub(super) fn get(&self) -> Option<(bool, bool)> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            1 => Some((false, false)),
            2 => Some((true, false)),
            _ => Some((true, true)),
        }
    }

    /// A feed that never says otherwise is taken as connected, its chain applying every change
    /// everywhere (a source whose follower reports its health says so before anything else).
    pub(super) fn starting(&self) {
        self.0.store(3, Ordering::Relaxed);
    }
}

/// Applies `feed` to the chain until the chain is dropped (`stop` fires) or the feed ends. Holds
/// the chain only while it applies a batch.
pub(super) fn follow<K: Key, V: Value>(
    chain: WeakTieredCache<K, V>,
    mut feed: ChangeFeed<K, V>,
    mut stop: oneshot::Receiver<()>,
) {
    tokio::spawn(async move {
        loop {
            // The chain's drop (stop) or the next item, whichever comes first.
            let next = std::future::poll_fn(|cx| {
                if Pin::new(&mut stop).poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                feed.poll_item(cx).map(Some)
            })
            .await;
            let Some(item) = next else { return };
            let Some(this) = chain.upgrade() else { return };
            match item {
                Some(Item::Changes(changes, done)) => {
                    let applied = this.apply(changes).await;
                    if let Some(done) = done {
                        let _ = done.send(applied);
                    }
                }
                Some(Item::Health(health)) => this.inner.feed_health.set(health),
                None => {
                    tracing::warn!("the source's change feed ended");
                    this.inner.feed_health.set(FeedHealth::Down);
                    return;
                }
            }
        }
    });
}
