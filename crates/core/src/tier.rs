//! The [`CacheTier`] trait: one cache level of the chain (memory, Redis, a fake); the
//! database below them is a [`Source`](crate::Source), a role of its own.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::entry::{Entry, Version};
use crate::error::Result;
use crate::stats::TierStats;

/// What a key must be: hashable, comparable, cheap enough to clone, and shareable.
pub trait Key: Hash + Eq + Clone + Send + Sync + 'static {}
impl<T: Hash + Eq + Clone + Send + Sync + 'static> Key for T {}

/// What a value must be: shareable across threads. Values are handed out as `Arc<V>`.
pub trait Value: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> Value for T {}

/// The answer of a tier's synchronous fast path ([`CacheTier::peek`]).
#[derive(Debug)]
pub enum Peek<V> {
    /// A fresh entry.
    Hit(Entry<V>),
    /// Nothing fresh here; the tier counted the miss.
    Miss,
    /// The tier has no synchronous path; call [`CacheTier::get`].
    Unsupported,
}

/// One cache tier of a [`TieredCache`](crate::TieredCache) (memory, Redis, yours). The
/// authoritative store at the bottom of the chain is a [`Source`](crate::Source), a trait of
/// its own.
///
/// A miss is `Ok(None)`, never an error. Entries carry the source's [`Version`]; a tier must
/// never replace a newer version with an older one, and after `invalidate(key, Some(v))` it must
/// refuse sets of versions `<= v` until the tombstone dies ([`Slot`](crate::Slot) implements
/// these rules for in-process tiers). When it stores an entry, a tier caps its expiry at its own
/// time to live ([`Entry::capped_expiry`]).
///
/// The trait is object safe; the chain stores `Arc<dyn CacheTier<K, V>>`.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait CacheTier<K: Key, V: Value>: Send + Sync {
    /// A short name for stats, traces and errors ("memory", "redis", "postgres").
    fn name(&self) -> &str;

    /// The synchronous fast path for tiers that answer without I/O: the chain calls it before
    /// [`get`](CacheTier::get). Tiers with I/O keep the default, [`Peek::Unsupported`].
    fn peek(&self, _key: &K) -> Peek<V> {
        Peek::Unsupported
    }

    /// Whether only this process fills this tier (an in-process cache), so that no other
    /// instance's fill can land in it. A clear of such a tier makes no second pass (see
    /// [`TieredCache::clear_tier`](crate::TieredCache::clear_tier)). Shared tiers keep the
    /// default, `false`.
    fn is_local(&self) -> bool {
        false
    }

    /// The fresh entry for `key`, or `Ok(None)`.
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>>;

    /// The fresh entries for `keys`, in order. The default calls [`get`](CacheTier::get) per key;
    /// tiers with a batch command (MGET, `= ANY($1)`) override it.
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// An expired entry for `key` that expired at most `max_stale` ago, kept for serving when the
    /// source is down (fail-safe). The default keeps none.
    async fn get_stale(&self, _key: &K, _max_stale: Duration) -> Result<Option<Entry<V>>> {
        Ok(None)
    }

    /// Stores `entry` unless the tier holds a newer version or a tombstone that refuses it.
    /// Returns whether it was stored.
    async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool>;

    /// Removes `key`'s entry if its version is `<= version` and leaves a tombstone refusing
    /// sets of versions `<= version`. `None` (a manual invalidation that knows no version)
    /// removes whatever entry the tier holds and leaves a tombstone just below its version, so
    /// that older versions cannot come back but the same version can be re-read.
    async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()>;

    /// [`invalidate`](CacheTier::invalidate) for several keys at once (the chain replays the
    /// invalidations a tier missed in batches). The default calls `invalidate` per key and stops
    /// at the first failure; tiers with a round trip per call pipeline them instead.
    async fn invalidate_many(&self, keys: &[(K, Option<Version>)]) -> Result<()> {
        for (key, version) in keys {
            self.invalidate(key, *version).await?;
        }
        Ok(())
    }

    /// Removes every entry of this tier (and only this tier's).
    async fn clear(&self) -> Result<()>;

    /// The tier's own statistics.
    fn stats(&self) -> TierStats;
}

macro_rules! forward_tier {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<K: Key, V: Value, T: CacheTier<K, V> + ?Sized> CacheTier<K, V> for $ptr<T> {
            fn name(&self) -> &str {
                (**self).name()
            }
            #[inline]
            fn peek(&self, key: &K) -> Peek<V> {
                (**self).peek(key)
            }
            fn is_local(&self) -> bool {
                (**self).is_local()
            }
            async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
                (**self).get(key).await
            }
            async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
                (**self).get_many(keys).await
            }
            async fn get_stale(&self, key: &K, max_stale: Duration) -> Result<Option<Entry<V>>> {
                (**self).get_stale(key, max_stale).await
            }
            async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool> {
                (**self).set(key, entry).await
            }
            async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()> {
                (**self).invalidate(key, version).await
            }
            async fn invalidate_many(&self, keys: &[(K, Option<Version>)]) -> Result<()> {
                (**self).invalidate_many(keys).await
            }
            async fn clear(&self) -> Result<()> {
                (**self).clear().await
            }
            fn stats(&self) -> TierStats {
                (**self).stats()
            }
        }
    )*};
}

forward_tier!(Arc, Box);

/// Compile-time proof that the trait stays object safe.
fn _object_safe(_: &dyn CacheTier<String, Vec<u8>>) {}
