//! Callers that give up: a dropped `update` future, a write that times out in the chain but
//! commits in the database afterwards, a dropped leader of a load. Whatever the caller does,
//! no cache may keep serving the version a write replaced.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Chain, Key, Val, key, val};
use tiercache_core::async_trait;
use tiercache_core::{CacheTier, Entry, Result, Source, TierStats, TieredCache, Version, Written};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Gate, Op};

/// Waits until `done` holds, checking every millisecond of (tokio) time, for at most `within`.
async fn eventually(within: Duration, mut done: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    done().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_caller_is_dropped_after_the_write_still_reaches_every_cache() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap(); // version 1 in memory and redis
    // The database commits the write, then the caller's future is dropped before the chain
    // has touched any cache.
    let gate = Gate::new();
    c.db.faults().set_for(Op::Write, Fault::Hold(gate.clone()));
    let update = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.update(&key("a"), val("v2")).await })
    };
    gate.arrived(1).await;
    assert_eq!(c.db.version(&key("a")), Some(2), "the write committed");
    update.abort();
    assert!(update.await.unwrap_err().is_cancelled());
    c.db.faults().clear();
    gate.open();
    let repopulated = eventually(Duration::from_secs(2), async || {
        c.memory_version("a").await == Some(2) && c.redis.version(&key("a")) == Some(2)
    })
    .await;
    assert!(
        repopulated,
        "memory holds {:?}, redis {:?}",
        c.memory_version("a").await,
        c.redis.version(&key("a"))
    );
    assert_eq!(c.cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// A source whose writes run in a task of their own, like a statement a database server keeps
/// executing after its client went away: a write the chain gave up on commits `delay` later.
#[derive(Clone)]
struct LateCommit {
    db: FakeSource<Key, Val>,
    delay: Duration,
}

#[async_trait]
impl Source<Key, Val> for LateCommit {
    fn name(&self) -> &str {
        "late-db"
    }
    async fn get(&self, key: &Key) -> Result<Option<Entry<Val>>> {
        self.db.get(key).await
    }
    async fn write(
        &self,
        key: &Key,
        value: Arc<Val>,
        expected: Option<Version>,
    ) -> Result<Written> {
        let (db, key, delay) = (self.db.clone(), key.clone(), self.delay);
        let commit = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            db.write(&key, value, expected).await
        });
        commit.await.expect("the commit task ran")
    }
    async fn delete(&self, key: &Key, expected: Option<Version>) -> Result<Written> {
        self.db.delete(key, expected).await
    }
    fn stats(&self) -> TierStats {
        self.db.stats()
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_that_commits_after_its_timeout_leaves_no_cache_on_the_old_version() {
    let db = FakeSource::<Key, Val>::new("db");
    let redis = FakeTier::<Key, Val>::cache("redis");
    let memory = Arc::new(MemoryTier::<Key, Val>::new());
    let cache = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .tier(redis.clone())
        .source_with_timeout(
            LateCommit {
                db: db.clone(),
                delay: Duration::from_millis(300),
            },
            Some(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    db.put(key("a"), "v1".to_string());
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 1);
    let err = cache.update(&key("a"), val("v2")).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // A reader right after the timeout: the write has not committed yet.
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 1);
    // It commits 200 ms after the chain gave up on it.
    let committed = eventually(Duration::from_secs(1), async || {
        db.version(&key("a")) == Some(2)
    });
    assert!(committed.await, "the late write committed");
    // Within a bounded few seconds no tier serves version 1 any more.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
    for (name, held) in [
        (
            "memory",
            memory
                .get_stale(&key("a"), Duration::MAX)
                .await
                .unwrap()
                .map(|e| e.version),
        ),
        ("redis", redis.version(&key("a"))),
    ] {
        assert!(held.is_none_or(|v| v == 2), "{name} holds version {held:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_whose_caller_is_dropped_half_way_still_reaches_every_tier() {
    let c = Chain::new();
    c.db.put(key("a"), "v1".to_string());
    c.cache.get(&key("a")).await.unwrap();
    c.db.put(key("a"), "edited behind the cache's back".to_string());
    // Redis is invalidated first (bottom first); the caller is dropped while it is held there.
    let gate = Gate::new();
    c.redis
        .faults()
        .set_for(Op::Invalidate, Fault::Hold(gate.clone()));
    let invalidation = {
        let cache = c.cache.clone();
        tokio::spawn(async move { cache.invalidate(&key("a")).await })
    };
    gate.arrived(1).await;
    invalidation.abort();
    assert!(invalidation.await.unwrap_err().is_cancelled());
    c.redis.faults().clear();
    gate.open();
    let emptied = eventually(Duration::from_secs(2), async || {
        c.memory_version("a").await.is_none()
    })
    .await;
    assert!(
        emptied,
        "memory still holds {:?}",
        c.memory_version("a").await
    );
    assert_eq!(c.cache.fetch(&key("a")).await.unwrap().version, 2);
}

/// A cache tier whose sets run in a task of their own, like a command Redis has received: a
/// set lands `delay` after it was sent, whether or not its caller is still there, and its
/// answer comes back `delay` after that.
#[derive(Clone)]
struct LateSet {
    redis: FakeTier<Key, Val>,
    delay: Duration,
}

#[async_trait]
impl CacheTier<Key, Val> for LateSet {
    fn name(&self) -> &str {
        "late-redis"
    }
    async fn get(&self, key: &Key) -> Result<Option<Entry<Val>>> {
        self.redis.get(key).await
    }
    async fn set(&self, key: &Key, entry: Entry<Val>) -> Result<bool> {
        let (redis, key, delay) = (self.redis.clone(), key.clone(), self.delay);
        let landing = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            redis.set(&key, entry).await
        });
        let stored = landing.await.expect("the set task ran");
        tokio::time::sleep(delay).await;
        stored
    }
    async fn invalidate(&self, key: &Key, version: Option<Version>) -> Result<()> {
        self.redis.invalidate(key, version).await
    }
    async fn clear(&self) -> Result<()> {
        self.redis.clear().await
    }
    fn stats(&self) -> TierStats {
        self.redis.stats()
    }
}

/// A reader's back-fill of a lower tier is sent, the key is invalidated, the fill lands after
/// the invalidation, and the reader's caller gives up before the check that follows the set:
/// the check runs all the same (in a task), and the copy is taken back at once, not left for
/// the invalidation's second pass. (A fill still on its way when its caller gives up is left
/// to that second pass, which comes once the tier's time limit has passed.)
#[tokio::test(start_paused = true)]
async fn a_fill_whose_caller_gave_up_during_its_set_is_still_checked_and_taken_back() {
    let (redis, db) = (FakeTier::<Key, Val>::cache("redis"), FakeSource::new("db"));
    db.put(key("a"), "v1".to_string());
    let cache: TieredCache<Key, Val> = TieredCache::builder()
        .tier(MemoryTier::new())
        .tier_with_timeout(
            LateSet {
                redis: redis.clone(),
                delay: Duration::from_millis(100),
            },
            Some(Duration::from_millis(500)),
        )
        .source(db.clone())
        .build()
        .unwrap();
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.fetch(&key("a")).await })
    };
    // The reader has loaded version 1 and sent its set (it lands at 100 ms, answered at 200).
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(cache.stats().source_loads, 1);
    db.put(key("a"), "edited".to_string());
    cache.invalidate(&key("a")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(110)).await;
    assert_eq!(
        redis.version(&key("a")),
        Some(1),
        "landed after the invalidation"
    );
    reader.abort();
    assert!(reader.await.unwrap_err().is_cancelled());
    // Well before the second pass (at 500 ms).
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(redis.version(&key("a")), None, "version 1 taken back");
    assert_eq!(cache.fetch(&key("a")).await.unwrap().version, 2);
}
