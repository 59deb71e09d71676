//! [`Backplane`]: how one instance tells the others that a key changed, so that their
//! in-process tiers drop older copies within milliseconds instead of at TTL expiry.

use std::sync::Arc;

use async_trait::async_trait;

use crate::entry::Version;
use crate::error::Result;

/// A channel between the service instances that share lower tiers.
///
/// After an update the chain publishes the key, its new version and the new value (an
/// implementation may leave the value out, for instance above a size); after a manual
/// invalidation, the key alone. Every other instance takes it through its one door for
/// remote changes, [`TieredCache::apply`](crate::TieredCache::apply), for its local tiers
/// ([`Changes::from_backplane`](crate::Changes::from_backplane) of
/// [`Change::announced`](crate::Change::announced)): if a local (in-process) tier holds the
/// key and the value came along, the copy is replaced by the new version; otherwise copies
/// older than the version are dropped and refused afterwards. Fills (read-through back-fills)
/// are never published. An implementation ignores its own messages, and when it may have
/// missed messages (its subscription dropped), tells its instance to flush its local tiers
/// ([`TieredCache::flush_local`](crate::TieredCache::flush_local)).
#[async_trait]
pub trait Backplane<K, V>: Send + Sync {
    /// Tells the other instances that `key` changed: they drop copies older than `version`
    /// (`None`: whatever they hold), or replace them with `value`, the value at `version`.
    /// Failures are the implementation's to retry; the chain counts and traces them.
    async fn publish(&self, key: &K, version: Option<Version>, value: Option<Arc<V>>)
    -> Result<()>;

    /// Sends what is still queued or waiting for a retry, for at most `within` (before a
    /// process exits). The default has nothing queued.
    ///
    /// # Errors
    /// [`Error::Unfinished`](crate::Error::Unfinished) naming how many messages are left.
    async fn flush(&self, _within: std::time::Duration) -> Result<()> {
        Ok(())
    }
}
