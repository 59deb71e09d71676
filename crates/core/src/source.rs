//! The [`Source`] trait: the authoritative store at the bottom of a chain (a database).

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::entry::{Entry, Version};
use crate::error::Result;
use crate::feed::ChangeFeed;
use crate::stats::TierStats;
use crate::tier::{Key, Value};

/// What a write or a delete did in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Written {
    /// The change committed with this new version.
    Changed(Version),
    /// Nothing changed: the stored value already equalled the one written (or, for a delete,
    /// nothing was stored). No new version, nothing for a cache to drop. The version is the
    /// stored one (0 if nothing is stored).
    Unchanged(Version),
}

impl Written {
    /// The key's version after the call.
    #[must_use]
    pub fn version(self) -> Version {
        match self {
            Written::Changed(v) | Written::Unchanged(v) => v,
        }
    }

    /// Whether a new version was committed.
    #[must_use]
    pub fn changed(self) -> bool {
        matches!(self, Written::Changed(_))
    }
}

/// One version of a key, as a source that keeps past versions has it
/// ([`Source::history`], [`Source::revision`]).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Revision<V> {
    /// The change's version.
    pub version: Version,
    /// The value it stored; `None`: the change deleted the key.
    pub value: Option<Arc<V>>,
    /// When it was written (its commit followed).
    pub at: SystemTime,
    /// Who wrote it, as the source knows (a database session's `application_name`).
    pub author: Option<String>,
}

impl<V> Revision<V> {
    /// A revision.
    #[must_use]
    pub fn new(
        version: Version,
        value: Option<Arc<V>>,
        at: SystemTime,
        author: Option<String>,
    ) -> Self {
        Revision {
            version,
            value,
            at,
            author,
        }
    }
}

impl<V> std::fmt::Debug for Revision<V> {
    /// Never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revision")
            .field("version", &self.version)
            .field("deleted", &self.value.is_none())
            .field("at", &self.at)
            .field("author", &self.author)
            .finish()
    }
}

/// The authoritative source of a [`TieredCache`](crate::TieredCache): the store every cache
/// tier is a copy of.
///
/// **Versions.** Every committed change of a key (a write or a delete, by anyone) gets a new
/// version from the source, greater than every version the key had before, even across a
/// delete and a re-creation; a version is never reused. Versions need not be consecutive (a
/// database numbers them from one sequence for all keys). A key never written reads as
/// `Ok(None)`; so does a deleted one.
///
/// **Conditional changes.** With `expected: Some(v)`, a write or delete only happens if the
/// key's stored version is `v` (0: nothing is stored); otherwise it fails with
/// [`Error::Conflict`](crate::Error::Conflict) carrying the stored version. The check and the
/// change are one atomic step.
///
/// **Unchanged writes.** A write whose value equals the stored one commits nothing and
/// returns [`Written::Unchanged`] with the stored version; a delete of a key with nothing
/// stored returns `Unchanged(0)`.
///
/// Entries the source returns carry no expiry. The trait is object safe; the chain stores an
/// `Arc<dyn Source<K, V>>`. `tiercache-testkit` has a fake (`FakeSource`), a mock
/// (`MockSource`, feature `mock` of this crate) and the contract every source passes.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Source<K: Key, V: Value>: Send + Sync {
    /// A short name for stats, traces and errors ("postgres", "sqlite").
    fn name(&self) -> &str;

    /// The stored value of `key` and its version, or `Ok(None)`.
    async fn get(&self, key: &K) -> Result<Option<Entry<V>>>;

    /// The stored values of `keys`, in order (a key asked twice is answered twice). The
    /// default calls [`get`](Source::get) per key; a database overrides it with one query.
    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Stores `value` under `key` (if its stored version is `expected`, when given).
    async fn write(&self, key: &K, value: Arc<V>, expected: Option<Version>) -> Result<Written>;

    /// Deletes `key` (if its stored version is `expected`, when given). The delete is a change
    /// with a version of its own, so that every cache can refuse the value it replaced.
    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written>;

    /// Starts following every change the source commits, by any writer, on a connection of
    /// its own, and returns the feed a chain applies them from
    /// ([`TieredCache`](crate::TieredCache) does it by itself). Each call starts one follower,
    /// which stops when the feed is dropped. `None` (the default): the source has no feed;
    /// its chains learn only of the changes made through them (and, with a backplane, through
    /// the other instances).
    fn follow(&self) -> Option<ChangeFeed<K, V>> {
        None
    }

    /// The source's own statistics.
    fn stats(&self) -> TierStats;

    /// [`write`](Source::write), naming who makes the change for the source's history (a
    /// service writing for one of its callers). The default ignores `author`: a source that
    /// keeps no author writes as [`write`](Source::write) does.
    async fn write_by(
        &self,
        key: &K,
        value: Arc<V>,
        expected: Option<Version>,
        author: &str,
    ) -> Result<Written> {
        let _ = author;
        self.write(key, value, expected).await
    }

    /// [`delete`](Source::delete), naming who makes the change (see
    /// [`write_by`](Source::write_by)).
    async fn delete_by(&self, key: &K, expected: Option<Version>, author: &str) -> Result<Written> {
        let _ = author;
        self.delete(key, expected).await
    }

    /// Past versions of `key`, newest first: at most `limit`, each older than `before` when
    /// given (to page back), for as long as the source keeps them (its retention). The default:
    /// [`Error::Unsupported`](crate::Error::Unsupported), a source that keeps no history.
    async fn history(
        &self,
        key: &K,
        before: Option<Version>,
        limit: usize,
    ) -> Result<Vec<Revision<V>>> {
        let _ = (key, before, limit);
        Err(crate::Error::unsupported(self.name(), "history"))
    }

    /// `key` at `version`, if the source still keeps it (`Ok(None)`: never a version of
    /// this key, or pruned). The default: unsupported.
    async fn revision(&self, key: &K, version: Version) -> Result<Option<Revision<V>>> {
        let _ = (key, version);
        Err(crate::Error::unsupported(self.name(), "revision"))
    }

    /// Removes every past version of `key` (deletion for privacy); returns how many. The
    /// default: unsupported.
    async fn purge_history(&self, key: &K) -> Result<u64> {
        let _ = key;
        Err(crate::Error::unsupported(self.name(), "purge_history"))
    }
}

macro_rules! forward_source {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<K: Key, V: Value, T: Source<K, V> + ?Sized> Source<K, V> for $ptr<T> {
            fn name(&self) -> &str {
                (**self).name()
            }
            async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
                (**self).get(key).await
            }
            async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
                (**self).get_many(keys).await
            }
            async fn write(
                &self,
                key: &K,
                value: Arc<V>,
                expected: Option<Version>,
            ) -> Result<Written> {
                (**self).write(key, value, expected).await
            }
            async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
                (**self).delete(key, expected).await
            }
            fn follow(&self) -> Option<ChangeFeed<K, V>> {
                (**self).follow()
            }
            fn stats(&self) -> TierStats {
                (**self).stats()
            }
            async fn write_by(
                &self,
                key: &K,
                value: Arc<V>,
                expected: Option<Version>,
                author: &str,
            ) -> Result<Written> {
                (**self).write_by(key, value, expected, author).await
            }
            async fn delete_by(
                &self,
                key: &K,
                expected: Option<Version>,
                author: &str,
            ) -> Result<Written> {
                (**self).delete_by(key, expected, author).await
            }
            async fn history(
                &self,
                key: &K,
                before: Option<Version>,
                limit: usize,
            ) -> Result<Vec<Revision<V>>> {
                (**self).history(key, before, limit).await
            }
            async fn revision(&self, key: &K, version: Version) -> Result<Option<Revision<V>>> {
                (**self).revision(key, version).await
            }
            async fn purge_history(&self, key: &K) -> Result<u64> {
                (**self).purge_history(key).await
            }
        }
    )*};
}

forward_source!(Arc, Box);

/// Compile-time proof that the trait stays object safe.
fn _object_safe(_: &dyn Source<String, Vec<u8>>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_reports_its_version_and_whether_it_changed() {
        assert_eq!(Written::Changed(4).version(), 4);
        assert_eq!(Written::Unchanged(3).version(), 3);
        assert!(Written::Changed(4).changed());
        assert!(!Written::Unchanged(3).changed());
    }
}
