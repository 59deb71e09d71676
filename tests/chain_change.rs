//! Conditional updates, deletes and unchanged writes through the chain, on fakes: what each
//! leaves in the caches and what it tells the other instances.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Chain, Key, Val, key, val};
use tiercache_core::{CacheTier, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{BackplaneHub, FakeSource, FakeTier};

#[tokio::test]
async fn a_conditional_update_at_the_stored_version_goes_through() {
    let c = Chain::new();
    let v1 = c.cache.update(&key("a"), val("v1")).await.unwrap();
    let v2 = c.cache.update_if(&key("a"), v1, val("v2")).await.unwrap();
    assert!(v2 > v1);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (v2, Origin::Tier(0)));
    assert_eq!(got.value.as_deref().map(String::as_str), Some("v2"));
}

#[tokio::test]
async fn a_conflict_changes_nothing_anywhere_and_reports_the_stored_version() {
    let c = Chain::new();
    let v1 = c.cache.update(&key("a"), val("v1")).await.unwrap();
    c.cache.get(&key("a")).await.unwrap();
    // Someone else wrote it meanwhile.
    let v2 = c.db.put(key("a"), "theirs".to_string());
    let err = c
        .cache
        .update_if(&key("a"), v1, val("mine"))
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(v2), "{err}");
    assert_eq!(c.db.version(&key("a")), Some(v2), "the source kept theirs");
    // The caches still hold what they held: a refused write touches nothing.
    assert_eq!(c.memory_version("a").await, Some(v1));
    assert_eq!(c.redis.version(&key("a")), Some(v1));
    assert_eq!(c.redis.calls().invalidate, 1, "only the first update's");
    // Reading the source (not a cache) gives the version to retry against.
    let fresh = c.cache.load(&key("a")).await.unwrap();
    assert_eq!((fresh.version, fresh.origin), (v2, Origin::Source));
    assert_eq!(
        c.memory_version("a").await,
        Some(v2),
        "the load filled memory"
    );
    let v3 = c.cache.update_if(&key("a"), v2, val("mine")).await.unwrap();
    assert!(v3 > v2);
}

#[tokio::test]
async fn expected_version_zero_means_nothing_is_stored() {
    let c = Chain::new();
    let v1 = c
        .cache
        .update_if(&key("new"), 0, val("first"))
        .await
        .unwrap();
    let err = c
        .cache
        .update_if(&key("new"), 0, val("second"))
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(v1));
}

/// Two instances on one hub, sharing a fake Redis and a source.
type Pair = (
    BackplaneHub<Key, Val>,
    FakeSource<Key, Val>,
    FakeTier<Key, Val>,
    [TieredCache<Key, Val>; 2],
);

/// Two instances on one hub, sharing a fake Redis and a source; messages are delivered before
/// `publish` returns.
fn pair() -> Pair {
    let hub = BackplaneHub::new(7);
    let db = FakeSource::<Key, Val>::new("db");
    let redis = FakeTier::cache("redis");
    let instance = || {
        let handle = hub.handle();
        let chain = TieredCache::builder()
            .tier(MemoryTier::new())
            .tier(redis.clone())
            .source(db.clone())
            .backplane(Arc::new(handle.clone()))
            .build()
            .unwrap();
        handle.attach(chain.clone());
        chain
    };
    let chains = [instance(), instance()];
    (hub, db, redis, chains)
}

#[tokio::test]
async fn an_unchanged_write_invalidates_nothing_publishes_nothing_and_is_counted() {
    let (hub, db, redis, [a, _b]) = pair();
    let v1 = a.update(&key("a"), val("same")).await.unwrap();
    let (delivered, invalidations) = (hub.delivered(), redis.calls().invalidate);
    assert_eq!(delivered, 1, "the first write told the other instance");
    let again = a.update(&key("a"), val("same")).await.unwrap();
    assert_eq!(again, v1, "no new version");
    assert_eq!(db.calls().write, 2);
    assert_eq!(redis.calls().invalidate, invalidations, "no invalidation");
    assert_eq!(
        hub.delivered(),
        delivered,
        "no message to the other instance"
    );
    let stats = a.stats();
    assert_eq!((stats.updates, stats.unchanged_writes), (1, 1));
}

#[tokio::test]
async fn an_unchanged_write_leaves_the_written_value_readable_here() {
    // The caches hold v1; the source was changed behind them to "new" and the change has not
    // reached this chain. Writing "new" changes nothing in the source, and this instance then
    // reads what it wrote (the stored version is filled like a read), not v1.
    let c = Chain::new();
    let v1 = c.cache.update(&key("a"), val("old")).await.unwrap();
    let v2 = c.db.put(key("a"), "new".to_string());
    assert_eq!(c.cache.update(&key("a"), val("new")).await.unwrap(), v2);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(
        (got.version, got.value.as_deref().map(String::as_str)),
        (v2, Some("new"))
    );
    assert!(v2 > v1);
}

#[tokio::test]
async fn a_delete_leaves_not_found_at_its_version_and_a_later_write_wins() {
    let c = Chain::new();
    let v1 = c.cache.update(&key("a"), val("v1")).await.unwrap();
    let gone = c.cache.delete(&key("a")).await.unwrap();
    assert!(gone > v1);
    // Every tier holds "not found" at the delete's version: older copies are refused.
    let memory = c
        .memory
        .get(&key("a"))
        .await
        .unwrap()
        .expect("not found, cached");
    assert!(memory.is_absent() && memory.version == gone, "{memory:?}");
    let redis = c.redis.entry(&key("a")).expect("not found, cached");
    assert!(redis.is_absent() && redis.version == gone);
    assert!(
        !c.redis
            .set(&key("a"), tiercache_core::Entry::new(val("v1"), v1))
            .await
            .unwrap(),
        "a late fill of the deleted version is refused"
    );
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert!(got.value.is_none() && got.origin == Origin::Tier(0));
    // Deleting again changes nothing.
    assert_eq!(c.cache.delete(&key("a")).await.unwrap(), 0);
    let v3 = c.cache.update(&key("a"), val("v3")).await.unwrap();
    assert!(v3 > gone);
    let got = c.cache.fetch(&key("a")).await.unwrap();
    assert_eq!(
        (got.version, got.value.as_deref().map(String::as_str)),
        (v3, Some("v3"))
    );
}

#[tokio::test]
async fn without_negative_caching_a_delete_leaves_tombstones_at_its_version() {
    let c = Chain::with(|b| b.negative_ttl(None));
    let v1 = c.cache.update(&key("a"), val("v1")).await.unwrap();
    let gone = c.cache.delete(&key("a")).await.unwrap();
    assert_eq!(c.memory_version("a").await, None);
    assert!(
        !c.redis
            .set(&key("a"), tiercache_core::Entry::new(val("v1"), v1))
            .await
            .unwrap()
    );
    assert!(
        !c.redis
            .set(&key("a"), tiercache_core::Entry::absent(gone))
            .await
            .unwrap(),
        "the tombstone is at the delete's own version"
    );
    assert!(c.cache.get(&key("a")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_delete_reaches_the_other_instances() {
    let (_hub, _db, _redis, [a, b]) = pair();
    a.update(&key("a"), val("v1")).await.unwrap();
    assert!(b.get(&key("a")).await.unwrap().is_some());
    let gone = a.delete(&key("a")).await.unwrap();
    let got = b.fetch(&key("a")).await.unwrap();
    assert!(got.value.is_none(), "b dropped its copy");
    let v3 = b.update(&key("a"), val("v3")).await.unwrap();
    assert!(v3 > gone);
    assert_eq!(
        a.get(&key("a"))
            .await
            .unwrap()
            .as_deref()
            .map(String::as_str),
        Some("v3")
    );
    a.flush(Duration::from_secs(1)).await.unwrap();
}

/// A source with a feed, the shared tier and two instances.
type Followers = (
    FakeSource<Key, Val>,
    FakeTier<Key, Val>,
    [TieredCache<Key, Val>; 2],
);

/// Two instances over a source with a change feed and no backplane: what they learn, they
/// learn from the source.
fn followers() -> Followers {
    let db = FakeSource::<Key, Val>::new("db").with_feed();
    let redis = FakeTier::cache("redis");
    let instance = || {
        TieredCache::builder()
            .tier(MemoryTier::new())
            .tier(redis.clone())
            .source(db.clone())
            .build()
            .unwrap()
    };
    (db.clone(), redis.clone(), [instance(), instance()])
}

/// Waits (a few scheduler turns) until `done`, or fails naming `what`.
async fn settled(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn a_change_behind_the_chains_back_reaches_every_instance_through_the_feed() {
    let (db, redis, [a, b]) = followers();
    db.put(key("k"), "v1".to_string());
    assert!(a.get(&key("k")).await.unwrap().is_some());
    assert!(b.get(&key("k")).await.unwrap().is_some());
    let v2 = db.put(key("k"), "v2".to_string());
    for (name, chain) in [("a", &a), ("b", &b)] {
        settled(&format!("{name} applied the change"), || {
            chain.stats().feed_changes >= 2
        })
        .await;
        let got = chain.fetch(&key("k")).await.unwrap();
        assert_eq!(
            (got.version, got.value.as_deref().map(String::as_str)),
            (v2, Some("v2")),
            "{name}"
        );
    }
    assert_eq!(redis.version(&key("k")), Some(v2));
    // A delete behind its back: "not found" everywhere, at the delete's version.
    let gone = db.remove(&key("k"));
    settled("a applied the delete", || a.stats().feed_changes >= 3).await;
    let got = a.fetch(&key("k")).await.unwrap();
    assert!(
        got.value.is_none() && got.origin == Origin::Tier(0),
        "{got:?}"
    );
    assert!(
        !redis
            .set(&key("k"), tiercache_core::Entry::new(val("v2"), v2))
            .await
            .unwrap()
    );
    assert!(gone > v2);
}

#[tokio::test]
async fn the_writer_applies_its_own_change_from_the_feed_too_and_it_changes_nothing_it_holds() {
    let (_db, redis, [a, _b]) = followers();
    let v1 = a.update(&key("k"), val("v1")).await.unwrap();
    settled("a applied its own change", || a.stats().feed_changes >= 1).await;
    let got = a.fetch(&key("k")).await.unwrap();
    assert_eq!(
        (got.version, got.origin),
        (v1, Origin::Tier(0)),
        "still a memory hit"
    );
    assert_eq!(redis.version(&key("k")), Some(v1));
}

#[tokio::test]
async fn everything_lost_empties_every_tier() {
    let (db, redis, [a, _b]) = followers();
    db.put(key("k"), "v1".to_string());
    a.get(&key("k")).await.unwrap();
    a.apply(tiercache_core::Changes::from_feed(
        tiercache_core::Scope::All,
        vec![tiercache_core::Change::Everything],
    ))
    .await;
    assert!(redis.is_empty());
    assert_eq!(a.fetch(&key("k")).await.unwrap().origin, Origin::Source);
    assert_eq!(a.stats().feed_flushes, 1);
}

#[tokio::test]
async fn a_dropped_chain_stops_following() {
    let (db, _redis, [a, b]) = followers();
    assert_eq!(db.followers(), 2);
    drop(a);
    // Without a change to wake it: the chain's drop alone ends its follower (a source's
    // follower holds a database connection for as long as its feed is open).
    settled("a's follower stopped", || db.followers() == 1).await;
    drop(b);
    settled("b's follower stopped", || db.followers() == 0).await;
}

#[tokio::test]
async fn changes_of_keys_an_instance_does_not_hold_cost_its_memory_nothing() {
    let db = FakeSource::<Key, Val>::new("db").with_feed();
    let memory = Arc::new(MemoryTier::builder().capacity(2).shards(1).build().unwrap());
    let chain = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .source(db.clone())
        .build()
        .unwrap();
    for hot in ["h1", "h2"] {
        db.put(key(hot), "v".to_string());
        chain.get(&key(hot)).await.unwrap();
    }
    // Other instances change 50 other keys: no tombstone takes the hot entries' places.
    for n in 0..50 {
        db.put(key(&format!("cold{n}")), "v".to_string());
    }
    settled("every change applied", || chain.stats().feed_changes >= 52).await;
    for hot in ["h1", "h2"] {
        assert_eq!(
            chain.fetch(&key(hot)).await.unwrap().origin,
            Origin::Tier(0),
            "{hot} still a memory hit"
        );
    }
}

#[tokio::test]
async fn observers_see_this_chains_writes_and_every_remote_change_once_applied() {
    let (db, _redis, [a, b]) = followers();
    let mut seen = a.subscribe_changes();
    // A write of this chain, with its value, as it commits; and the same write from the feed
    // (in either order: its version says it is not new).
    let v1 = a.update(&key("k"), val("v1")).await.unwrap();
    let both = [seen.recv().await.unwrap(), seen.recv().await.unwrap()];
    for change in &both {
        assert_eq!(
            (change.key(), change.version()),
            (Some(&key("k")), Some(v1))
        );
    }
    assert!(
        both.iter().any(|c| matches!(c, tiercache_core::Change::Key { value: Some(v), deleted: false, .. } if v.as_str() == "v1")),
        "the write's own change carries its value: {both:?}"
    );
    // Another instance's delete and a write with plain SQL reach this chain through its feed,
    // after it applied them: its memory no longer holds v1 by then.
    a.get(&key("k")).await.unwrap();
    let v2 = b.delete(&key("k")).await.unwrap();
    let deleted = seen.recv().await.unwrap();
    assert!(
        matches!(deleted, tiercache_core::Change::Key { deleted: true, version: Some(v), .. } if v == v2),
        "{deleted:?}"
    );
    assert_ne!(a.fetch(&key("k")).await.unwrap().version, v1);
    let v3 = db.put(key("k"), "v3".to_string());
    assert_eq!(seen.recv().await.unwrap().version(), Some(v3));
    // A write that changed nothing tells nobody.
    let v4 = a.update(&key("k"), val("v4")).await.unwrap();
    assert_eq!(a.update(&key("k"), val("v4")).await.unwrap(), v4);
    assert_eq!(seen.recv().await.unwrap().version(), Some(v4)); // the write
    assert_eq!(seen.recv().await.unwrap().version(), Some(v4)); // the feed
    assert!(seen.try_recv().is_err(), "nothing for the unchanged write");
}
