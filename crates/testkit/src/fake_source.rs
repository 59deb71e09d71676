//! [`FakeSource`]: an in-memory authoritative source that counts its calls and takes faults.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tiercache_core::feed::ChangeSender;
use tiercache_core::{
    Change, ChangeFeed, Entry, Error, Key, Result, Scope, Source, TierStats, Value, Version,
    Written,
};

use crate::fake::{Calls, bump};
use crate::fault::{FaultSwitch, Op};

/// What the source holds for a key: the value (`None` after a delete) and its version.
struct Stored<V> {
    value: Option<Arc<V>>,
    version: Version,
}

#[derive(Default)]
struct Counters {
    get: AtomicU64,
    get_many: AtomicU64,
    write: AtomicU64,
    delete: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner<K, V> {
    name: String,
    rows: Mutex<HashMap<K, Stored<V>>>,
    calls: Counters,
    faults: FaultSwitch,
    /// With a feed: the chains following it.
    followers: Option<Mutex<Vec<ChangeSender<K, V>>>>,
}

/// An in-memory [`Source`] for tests. It numbers each key's changes 1, 2, 3, ... (a delete is
/// a change too, so a key deleted at version 3 is written again at 4), refuses conditional
/// changes whose expected version is not the stored one with [`Error::Conflict`], and commits
/// nothing for a write of the value already stored ([`Written::Unchanged`]). Every call is
/// counted ([`calls`](Self::calls)); faults go through [`faults`](Self::faults) (deletes
/// under [`Op::Write`]).
///
/// Clones share everything, so keep a clone to inspect the source you gave to a chain.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::{Source, Written};
/// use tiercache_testkit::FakeSource;
///
/// let db = FakeSource::<&str, u32>::new("db");
/// assert_eq!(db.write(&"a", Arc::new(1), None).await?, Written::Changed(1));
/// assert_eq!(db.write(&"a", Arc::new(1), None).await?, Written::Unchanged(1));
/// assert!(db.write(&"a", Arc::new(2), Some(0)).await.is_err()); // a conflict
/// assert_eq!(db.delete(&"a", None).await?, Written::Changed(2));
/// assert_eq!(db.write(&"a", Arc::new(3), Some(0)).await?, Written::Changed(3));
/// # Ok(())
/// # }
/// ```
pub struct FakeSource<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for FakeSource<K, V> {
    fn clone(&self) -> Self {
        FakeSource {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for FakeSource<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeSource")
            .field("name", &self.inner.name)
            .field("faults", &self.inner.faults)
            .finish_non_exhaustive()
    }
}

impl<K: Key, V: Value> FakeSource<K, V> {
    /// An empty source.
    #[must_use]
    pub fn new(name: &str) -> Self {
        FakeSource {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                rows: Mutex::new(HashMap::new()),
                calls: Counters::default(),
                faults: FaultSwitch::new(),
                followers: None,
            }),
        }
    }

    /// A source with a change feed: every change (through a chain, or behind its back with
    /// [`put`](Self::put) and [`remove`](Self::remove)) is announced to the chains that follow
    /// it, at once, in order.
    ///
    /// # Panics
    /// When a change is made, if a following chain is more than
    /// [`FEED_BUFFER`](tiercache_core::feed::FEED_BUFFER) batches behind.
    #[must_use]
    pub fn with_feed(self) -> Self {
        let mut this = self;
        Arc::get_mut(&mut this.inner)
            .expect("configure a FakeSource before cloning it")
            .followers = Some(Mutex::new(Vec::new()));
        this
    }

    /// Chains following the feed now (a dropped chain stops following).
    #[must_use]
    pub fn followers(&self) -> usize {
        self.inner.followers.as_ref().map_or(0, |f| {
            f.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|f| !f.is_closed())
                .count()
        })
    }

    /// Announces `key`'s change at `version` to the following chains.
    fn announce(&self, key: &K, version: Version, deleted: bool) {
        let Some(followers) = &self.inner.followers else {
            return;
        };
        let mut followers = followers.lock().unwrap_or_else(PoisonError::into_inner);
        followers.retain(|f| !f.is_closed());
        for follower in followers.iter() {
            let change = if deleted {
                Change::deleted(key.clone(), version)
            } else {
                Change::written(key.clone(), version)
            };
            assert!(
                follower.try_send(Scope::All, vec![change]),
                "a chain following the fake source fell too far behind"
            );
        }
    }

    /// Uses `faults` as the fault switch (for example one made by
    /// [`FaultSwitch::with_seed`]).
    #[must_use]
    pub fn with_faults(self, faults: FaultSwitch) -> Self {
        let mut this = self;
        Arc::get_mut(&mut this.inner)
            .expect("configure a FakeSource before cloning it")
            .faults = faults;
        this
    }

    /// The fault switch.
    #[must_use]
    pub fn faults(&self) -> &FaultSwitch {
        &self.inner.faults
    }

    /// The call counts so far (`get`, `get_many`, `write`, `delete`).
    #[must_use]
    pub fn calls(&self) -> Calls {
        let c = &self.inner.calls;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Calls {
            get: l(&c.get),
            get_many: l(&c.get_many),
            write: l(&c.write),
            delete: l(&c.delete),
            ..Calls::default()
        }
    }

    fn rows(&self) -> MutexGuard<'_, HashMap<K, Stored<V>>> {
        self.inner
            .rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `value` behind every cache's back (no call is counted), as someone changing the
    /// database directly would: the key's next version. Returns it.
    pub fn put(&self, key: K, value: impl Into<Arc<V>>) -> Version {
        let mut rows = self.rows();
        let version = rows.get(&key).map_or(0, |s| s.version) + 1;
        rows.insert(
            key.clone(),
            Stored {
                value: Some(value.into()),
                version,
            },
        );
        drop(rows);
        self.announce(&key, version, false);
        version
    }

    /// Deletes `key` behind every cache's back; returns the delete's version (0 if nothing
    /// was stored).
    pub fn remove(&self, key: &K) -> Version {
        let version = match self.rows().get_mut(key) {
            Some(stored) if stored.value.is_some() => {
                stored.value = None;
                stored.version += 1;
                stored.version
            }
            _ => return 0,
        };
        self.announce(key, version, true);
        version
    }

    /// The stored entry for `key`, without counting a call.
    #[must_use]
    pub fn entry(&self, key: &K) -> Option<Entry<V>> {
        let rows = self.rows();
        let stored = rows.get(key)?;
        stored
            .value
            .as_ref()
            .map(|v| Entry::new(Arc::clone(v), stored.version))
    }

    /// The version of the value stored for `key`.
    #[must_use]
    pub fn version(&self, key: &K) -> Option<Version> {
        self.entry(key).map(|e| e.version)
    }

    /// Keys with a stored value.
    #[must_use]
    pub fn len(&self) -> usize {
        self.rows().values().filter(|s| s.value.is_some()).count()
    }

    /// Whether no value is stored.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, key: &K) -> Option<Entry<V>> {
        let found = self.entry(key);
        bump(if found.is_some() {
            &self.inner.calls.hits
        } else {
            &self.inner.calls.misses
        });
        found
    }

    /// Checks `expected` against what is stored for `key` (`None`: no condition).
    fn check(&self, stored: Option<&Stored<V>>, expected: Option<Version>) -> Result<()> {
        let current = stored
            .filter(|s| s.value.is_some())
            .map_or(0, |s| s.version);
        match expected {
            Some(expected) if expected != current => Err(Error::Conflict {
                tier: self.inner.name.clone(),
                expected,
                current,
            }),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl<K: Key, V: Value + PartialEq> Source<K, V> for FakeSource<K, V> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        bump(&self.inner.calls.get);
        self.inner
            .faults
            .run(&self.inner.name, Op::Get, async { Ok(self.lookup(key)) })
            .await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        bump(&self.inner.calls.get_many);
        self.inner
            .faults
            .run(&self.inner.name, Op::Get, async {
                Ok(keys.iter().map(|k| self.lookup(k)).collect())
            })
            .await
    }

    async fn write(&self, key: &K, value: Arc<V>, expected: Option<Version>) -> Result<Written> {
        bump(&self.inner.calls.write);
        self.inner
            .faults
            .run(&self.inner.name, Op::Write, async {
                let mut rows = self.rows();
                let stored = rows.get(key);
                self.check(stored, expected)?;
                if let Some(Stored {
                    value: Some(old),
                    version,
                }) = stored
                    && **old == *value
                {
                    return Ok(Written::Unchanged(*version));
                }
                let version = stored.map_or(0, |s| s.version) + 1;
                rows.insert(
                    key.clone(),
                    Stored {
                        value: Some(value),
                        version,
                    },
                );
                drop(rows);
                self.announce(key, version, false);
                Ok(Written::Changed(version))
            })
            .await
    }

    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
        bump(&self.inner.calls.delete);
        self.inner
            .faults
            .run(&self.inner.name, Op::Write, async {
                let mut rows = self.rows();
                self.check(rows.get(key), expected)?;
                let version = match rows.get_mut(key) {
                    Some(stored) if stored.value.is_some() => {
                        stored.value = None;
                        stored.version += 1;
                        stored.version
                    }
                    _ => return Ok(Written::Unchanged(0)),
                };
                drop(rows);
                self.announce(key, version, true);
                Ok(Written::Changed(version))
            })
            .await
    }

    fn follow(&self) -> Option<ChangeFeed<K, V>> {
        let followers = self.inner.followers.as_ref()?;
        let (sender, feed) = tiercache_core::feed::channel();
        followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
        Some(feed)
    }

    fn stats(&self) -> TierStats {
        let c = &self.inner.calls;
        TierStats::new(
            self.inner.name.clone(),
            c.hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
        )
        .with_size(self.len() as u64, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn numbers_changes_per_key_across_deletes() {
        let db = FakeSource::<&str, u32>::new("db");
        assert_eq!(
            db.write(&"a", Arc::new(1), None).await.unwrap().version(),
            1
        );
        assert_eq!(
            db.write(&"a", Arc::new(2), None).await.unwrap().version(),
            2
        );
        assert_eq!(
            db.write(&"b", Arc::new(3), None).await.unwrap().version(),
            1
        );
        let got = db.get(&"a").await.unwrap().unwrap();
        assert_eq!(
            (*got.value.unwrap(), got.version, got.expires_at),
            (2, 2, None)
        );
        assert_eq!(db.delete(&"a", Some(2)).await.unwrap(), Written::Changed(3));
        assert!(db.get(&"a").await.unwrap().is_none());
        assert_eq!(db.delete(&"a", None).await.unwrap(), Written::Unchanged(0));
        assert_eq!(db.put("a", 7), 4);
        assert_eq!(db.remove(&"a"), 5);
        assert_eq!(db.remove(&"a"), 0);
        let calls = db.calls();
        assert_eq!((calls.write, calls.delete, calls.get), (3, 2, 2));
    }

    #[tokio::test]
    async fn conditional_changes_check_the_stored_version() {
        let db = FakeSource::<&str, u32>::new("db");
        let err = db.write(&"a", Arc::new(1), Some(3)).await.unwrap_err();
        assert_eq!(err.conflict(), Some(0));
        assert_eq!(
            db.write(&"a", Arc::new(1), Some(0)).await.unwrap(),
            Written::Changed(1)
        );
        let err = db.write(&"a", Arc::new(2), Some(0)).await.unwrap_err();
        assert_eq!(err.conflict(), Some(1));
        assert_eq!(
            db.delete(&"a", Some(2)).await.unwrap_err().conflict(),
            Some(1)
        );
        assert_eq!(
            db.version(&"a"),
            Some(1),
            "a refused change changes nothing"
        );
    }
}
