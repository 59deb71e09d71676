//! [`Backplane`]: how one instance tells the others that a key changed, so that their
//! in-process tiers drop older copies within milliseconds instead of at TTL expiry.

use async_trait::async_trait;

use crate::entry::Version;
use crate::error::Result;

/// A channel between the service instances that share lower tiers.
///
/// After an update the chain publishes the key and its new version; after a manual
/// invalidation, the key without a version. Every other instance applies it with
/// [`TieredCache::apply_remote_invalidation`](crate::TieredCache::apply_remote_invalidation):
/// its top (in-process) tier drops copies older than the version, and refuses them afterwards.
/// Fills are never published. An implementation ignores its own messages, and when it may
/// have missed messages (its subscription dropped), tells its instance to flush its top tier
/// ([`TieredCache::flush_local`](crate::TieredCache::flush_local)).
#[async_trait]
pub trait Backplane<K>: Send + Sync {
    /// Tells the other instances that `key` changed: they drop copies older than `version`
    /// (`None`: whatever they hold). Failures are the implementation's to retry; the chain
    /// counts and traces them.
    async fn publish(&self, key: &K, version: Option<Version>) -> Result<()>;
}
