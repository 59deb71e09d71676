//! The Redis tier's contract: every check runs against one server (`redis.rs`) and against a
//! three-master Redis Cluster (`cluster.rs`), each under its own key prefix.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache_core::{CacheTier, Entry};
use tiercache_redis::{RedisTier, RedisTierBuilder, envelope};
use tiercache_testkit::redis_env;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub theme: String,
    pub size: u32,
}

pub fn config(theme: &str) -> Arc<Config> {
    Arc::new(Config {
        theme: theme.into(),
        size: 14,
    })
}

pub fn k(s: &str) -> String {
    s.to_string()
}

fn t_now() -> tiercache_core::Timestamp {
    tiercache_core::Clock::system().now()
}

/// Where the tiers under test connect: one server, or a cluster's seed nodes.
pub enum Setup {
    Single { url: String },
    Cluster { nodes: Vec<String> },
}

/// A raw connection beside the tier, to look at and tamper with what it stores.
pub enum Raw {
    Single(redis::aio::MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: redis::Cmd) -> T {
        match self {
            Raw::Single(c) => cmd.query_async(c).await.unwrap(),
            #[cfg(feature = "cluster")]
            Raw::Cluster(c) => cmd.query_async(c).await.unwrap(),
        }
    }

    pub async fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.query(cmd).await
    }

    pub async fn set(&mut self, key: &str, bytes: &[u8]) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(bytes).arg("PX").arg(60_000);
        self.query::<()>(cmd).await;
    }

    pub async fn del(&mut self, key: &str) {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        self.query::<i64>(cmd).await;
    }
}

impl Setup {
    pub async fn single() -> Self {
        Setup::Single {
            url: redis_env::redis_url().await,
        }
    }

    /// A builder for a tier under `prefix`, with test-friendly settings.
    pub fn builder(&self, prefix: &str) -> RedisTierBuilder<String, Config> {
        let builder = RedisTier::builder()
            .prefix(prefix)
            .jitter(0.0)
            .timeout(Duration::from_secs(2));
        match self {
            Setup::Single { url } => builder.url(url.clone()),
            #[cfg(feature = "cluster")]
            Setup::Cluster { nodes } => builder.cluster(nodes.clone()),
            #[cfg(not(feature = "cluster"))]
            Setup::Cluster { .. } => unreachable!("cluster tests need the `cluster` feature"),
        }
    }

    pub async fn raw(&self) -> Raw {
        match self {
            Setup::Single { url } => Raw::Single(
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            ),
            #[cfg(feature = "cluster")]
            Setup::Cluster { nodes } => Raw::Cluster(
                redis::cluster::ClusterClient::new(nodes.clone())
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap(),
            ),
            #[cfg(not(feature = "cluster"))]
            Setup::Cluster { .. } => unreachable!("cluster tests need the `cluster` feature"),
        }
    }

    pub async fn tier(&self, tag: &str) -> (RedisTier<String, Config>, Raw) {
        let tier = self
            .builder(&redis_env::unique_prefix(tag))
            .build()
            .unwrap();
        (tier, self.raw().await)
    }
}

/// Every check, in turn.
pub async fn run_all(s: &Setup) {
    set_get_and_remaining_ttl(s).await;
    an_entry_expiring_sooner_keeps_its_own_expiry(s).await;
    entries_expire_in_redis(s).await;
    older_versions_never_overwrite_newer_ones(s).await;
    tombstones_refuse_versions_up_to_theirs(s).await;
    a_tombstone_refuses_until_it_dies(s).await;
    manual_invalidation_refuses_older_versions_only(s).await;
    invalidate_many_applies_each_rule_per_key(s).await;
    get_many_keeps_order_and_misses(s).await;
    clear_removes_only_this_prefix(s).await;
    corrupt_bytes_are_a_miss_deleted_and_counted(s).await;
    large_values_are_compressed_and_round_trip(s).await;
    keys_with_separators_and_globs_do_not_collide(s).await;
    both_codecs_round_trip_and_read_each_other(s).await;
}

pub async fn set_get_and_remaining_ttl(s: &Setup) {
    let (t, _con) = s.tier("roundtrip").await;
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(t.set(&k("a"), Entry::new(config("dark"), 3)).await.unwrap());
    let e = t.get(&k("a")).await.unwrap().unwrap();
    assert_eq!((e.version, &*e.value.unwrap()), (3, &*config("dark")));
    let left = e.expires_at.unwrap().saturating_since(t_now());
    assert!(
        left > Duration::from_secs(1700) && left <= Duration::from_secs(1800),
        "{left:?}"
    );
    // A not-found is stored too.
    assert!(t.set(&k("ghost"), Entry::absent(0)).await.unwrap());
    let ghost = t.get(&k("ghost")).await.unwrap().unwrap();
    assert!(ghost.value.is_none());
    assert!(t.is_connected());
    let s = t.stats();
    assert_eq!((s.hits, s.misses), (2, 1));
}

pub async fn an_entry_expiring_sooner_keeps_its_own_expiry(s: &Setup) {
    let (t, _con) = s.tier("capped").await;
    let soon = Entry::new(config("x"), 1).expiring_at(t_now() + Duration::from_secs(5));
    t.set(&k("a"), soon).await.unwrap();
    let e = t.get(&k("a")).await.unwrap().unwrap();
    assert!(e.expires_at.unwrap().saturating_since(t_now()) <= Duration::from_secs(5));
    let past = Entry::new(config("x"), 2).expiring_at(t_now());
    assert!(!t.set(&k("b"), past).await.unwrap(), "nothing to store");
}

pub async fn entries_expire_in_redis(s: &Setup) {
    let t: RedisTier<String, Config> = s
        .builder(&redis_env::unique_prefix("expiry"))
        .ttl(Duration::from_millis(200))
        .jitter(0.0)
        .build()
        .unwrap();
    t.set(&k("a"), Entry::new(config("x"), 1)).await.unwrap();
    assert!(t.get(&k("a")).await.unwrap().is_some());
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if t.get(&k("a")).await.unwrap().is_none() {
            gone = true;
            break;
        }
    }
    assert!(gone, "Redis expired the entry");
}

pub async fn older_versions_never_overwrite_newer_ones(s: &Setup) {
    let (t, _con) = s.tier("versions").await;
    assert!(t.set(&k("a"), Entry::new(config("v5"), 5)).await.unwrap());
    assert!(!t.set(&k("a"), Entry::new(config("v4"), 4)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v5b"), 5)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v6"), 6)).await.unwrap());
    let e = t.get(&k("a")).await.unwrap().unwrap();
    assert_eq!((e.version, e.value.unwrap().theme.as_str()), (6, "v6"));
    assert_eq!(t.stats().rejected_sets, 1);
}

pub async fn tombstones_refuse_versions_up_to_theirs(s: &Setup) {
    let (t, mut con) = s.tier("tombstones").await;
    t.set(&k("a"), Entry::new(config("v1"), 1)).await.unwrap();
    t.invalidate(&k("a"), Some(1)).await.unwrap();
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(!t.set(&k("a"), Entry::new(config("v1"), 1)).await.unwrap());
    // A tombstone keeps the higher version.
    t.invalidate(&k("a"), Some(0)).await.unwrap();
    let stored = envelope::decode(&con.get(&t.redis_key(&k("a"))).await.unwrap());
    assert_eq!(stored, Ok(envelope::Stored::Tombstone { version: 1 }));
    assert!(t.set(&k("a"), Entry::new(config("v2"), 2)).await.unwrap());
    // An invalidation of older versions leaves a newer entry.
    t.invalidate(&k("a"), Some(1)).await.unwrap();
    assert_eq!(t.get(&k("a")).await.unwrap().unwrap().version, 2);
    // Invalidating a key never seen leaves a tombstone against its older versions.
    t.invalidate(&k("new"), Some(3)).await.unwrap();
    assert!(!t.set(&k("new"), Entry::new(config("v3"), 3)).await.unwrap());
    assert!(t.set(&k("new"), Entry::new(config("v4"), 4)).await.unwrap());
}

/// A tombstone refuses older versions while it lives and is gone once its TTL has passed: a late
/// back-fill of an old version is then stored (the chain's marks and floors, not the tier, guard
/// against that; `tests/rules.rs`).
pub async fn a_tombstone_refuses_until_it_dies(s: &Setup) {
    let tier = s
        .builder(&redis_env::unique_prefix("tombstone-ttl"))
        .tombstone_ttl(Duration::from_millis(400))
        .build()
        .unwrap();
    tier.set(&k("a"), Entry::new(config("v2"), 2))
        .await
        .unwrap();
    tier.invalidate(&k("a"), Some(2)).await.unwrap();
    assert!(
        !tier
            .set(&k("a"), Entry::new(config("v1"), 1))
            .await
            .unwrap(),
        "alive"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tier
            .set(&k("a"), Entry::new(config("v1"), 1))
            .await
            .unwrap()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the tombstone died");
    }
    assert_eq!(tier.get(&k("a")).await.unwrap().unwrap().version, 1);
}

pub async fn manual_invalidation_refuses_older_versions_only(s: &Setup) {
    let (t, mut con) = s.tier("manual").await;
    t.set(&k("a"), Entry::new(config("v3"), 3)).await.unwrap();
    t.invalidate(&k("a"), None).await.unwrap();
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(!t.set(&k("a"), Entry::new(config("v2"), 2)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v3"), 3)).await.unwrap());
    // A not-found at version 0 is simply removed.
    t.set(&k("b"), Entry::absent(0)).await.unwrap();
    t.invalidate(&k("b"), None).await.unwrap();
    assert!(con.get(&t.redis_key(&k("b"))).await.is_none());
    // Nothing held: nothing written.
    t.invalidate(&k("c"), None).await.unwrap();
    assert!(con.get(&t.redis_key(&k("c"))).await.is_none());
}

/// The batch form the chain replays missed invalidations with: each key as `invalidate` would.
pub async fn invalidate_many_applies_each_rule_per_key(s: &Setup) {
    let (t, _con) = s.tier("inval_many").await;
    for (name, version) in [("old", 1), ("new", 5), ("manual", 3)] {
        t.set(&k(name), Entry::new(config(name), version))
            .await
            .unwrap();
    }
    let batch: Vec<(String, Option<u64>)> = (0..300)
        .map(|i| (format!("absent{i}"), Some(1)))
        .chain([
            (k("old"), Some(2)),
            (k("new"), Some(2)),
            (k("manual"), None),
        ])
        .collect();
    t.invalidate_many(&batch).await.unwrap();
    assert!(t.get(&k("old")).await.unwrap().is_none(), "removed");
    assert!(!t.set(&k("old"), Entry::new(config("x"), 2)).await.unwrap());
    assert_eq!(
        t.get(&k("new")).await.unwrap().unwrap().version,
        5,
        "newer kept"
    );
    assert!(t.get(&k("manual")).await.unwrap().is_none());
    assert!(
        t.set(&k("manual"), Entry::new(config("x"), 3))
            .await
            .unwrap()
    );
    assert!(
        !t.set(&k("absent299"), Entry::new(config("x"), 1))
            .await
            .unwrap()
    );
    t.invalidate_many(&[]).await.unwrap();
}

pub async fn get_many_keeps_order_and_misses(s: &Setup) {
    let (t, _con) = s.tier("many").await;
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        t.set(&k(name), Entry::new(config(name), i as u64 + 1))
            .await
            .unwrap();
    }
    let keys: Vec<String> = ["c", "nope", "a", "a"].into_iter().map(k).collect();
    let got = t.get_many(&keys).await.unwrap();
    let versions: Vec<Option<u64>> = got.iter().map(|e| e.as_ref().map(|e| e.version)).collect();
    assert_eq!(versions, [Some(3), None, Some(1), Some(1)]);
    // More keys than one script call takes.
    let many: Vec<String> = (0..2500).map(|i| format!("k{i}")).collect();
    t.set(&many[2400], Entry::new(config("late"), 9))
        .await
        .unwrap();
    let got = t.get_many(&many).await.unwrap();
    assert_eq!(got.len(), 2500);
    assert_eq!(got.iter().filter(|e| e.is_some()).count(), 1);
    assert_eq!(got[2400].as_ref().unwrap().version, 9);
}

pub async fn clear_removes_only_this_prefix(s: &Setup) {
    let mut con = s.raw().await;
    let base = redis_env::unique_prefix("clear");
    let mine: RedisTier<String, Config> = s.builder(&base).build().unwrap();
    // Another cache whose prefix extends ours, and a key that merely starts like ours.
    let sibling: RedisTier<String, Config> = s.builder(&format!("{base}x:")).build().unwrap();
    for key in ["a", "b*", "x:1"] {
        mine.set(&k(key), Entry::new(config(key), 1)).await.unwrap();
    }
    sibling
        .set(&k("1"), Entry::new(config("s"), 1))
        .await
        .unwrap();
    let stranger = format!("{base}not:ours");
    con.set(&stranger, b"someone else's").await;

    mine.clear().await.unwrap();
    for key in ["a", "b*", "x:1"] {
        assert!(mine.get(&k(key)).await.unwrap().is_none(), "{key}");
    }
    assert!(sibling.get(&k("1")).await.unwrap().is_some());
    assert_eq!(
        con.get(&stranger).await.as_deref(),
        Some(&b"someone else's"[..])
    );
    con.del(&stranger).await;
}

pub async fn corrupt_bytes_are_a_miss_deleted_and_counted(s: &Setup) {
    let (t, mut con) = s.tier("corrupt").await;
    let json = envelope::Codec::Json;
    let mut wrong_format = envelope::encode_value(1, 0, b"{}", json, None);
    wrong_format[2] = 9;
    let mut truncated =
        envelope::encode_value(1, 0, &"z".repeat(4000).into_bytes(), json, Some(10));
    truncated.truncate(40);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random", (0..64u8).map(|i| i.wrapping_mul(37)).collect()),
        ("short", b"TC".to_vec()),
        ("format", wrong_format),
        ("truncated", truncated),
        // A valid envelope whose JSON is not a Config.
        (
            "shape",
            envelope::encode_value(1, 0, b"{\"theme\": 5}", json, None),
        ),
        // A valid envelope whose MessagePack is not a Config.
        (
            "msgpack",
            envelope::encode_value(
                1,
                0,
                &[0x81, 0xa5, b't', b'h', b'e', b'm', b'e', 0x05],
                envelope::Codec::MessagePack,
                None,
            ),
        ),
    ];
    for (name, bytes) in &cases {
        let key = t.redis_key(&k(name));
        con.set(&key, bytes).await;
        assert!(t.get(&k(name)).await.unwrap().is_none(), "{name}");
        assert!(con.get(&key).await.is_none(), "{name} deleted");
    }
    assert_eq!(t.stats().corrupt, cases.len() as u64);
    // The set script overwrites what it cannot parse.
    let key = t.redis_key(&k("over"));
    con.set(&key, b"garbage").await;
    assert!(
        t.set(&k("over"), Entry::new(config("ok"), 1))
            .await
            .unwrap()
    );
    assert_eq!(t.get(&k("over")).await.unwrap().unwrap().version, 1);
}

pub async fn large_values_are_compressed_and_round_trip(s: &Setup) {
    let (t, mut con) = s.tier("compress").await;
    let big = Arc::new(Config {
        theme: "t".repeat(20_000),
        size: 1,
    });
    t.set(&k("big"), Entry::new(big.clone(), 1)).await.unwrap();
    let raw = con.get(&t.redis_key(&k("big"))).await.unwrap();
    assert!(raw.len() < 2_000, "stored {} bytes", raw.len());
    assert_eq!(
        *t.get(&k("big")).await.unwrap().unwrap().value.unwrap(),
        *big
    );
}

pub async fn keys_with_separators_and_globs_do_not_collide(s: &Setup) {
    let (t, _con) = s.tier("keys").await;
    let keys = ["a:b", "a%3Ab", "*", "?", "[x]", "é", "a b", ""];
    for (i, key) in keys.iter().enumerate() {
        t.set(&k(key), Entry::new(config(key), i as u64 + 1))
            .await
            .unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let e = t.get(&k(key)).await.unwrap().unwrap();
        assert_eq!(e.version, i as u64 + 1, "{key:?}");
    }
}

pub async fn both_codecs_round_trip_and_read_each_other(s: &Setup) {
    let (msgpack, _con) = s.tier("codec_mp").await;
    let json: RedisTier<String, Config> = s
        .builder(msgpack.prefix())
        .codec(envelope::Codec::Json)
        .build()
        .unwrap();
    msgpack
        .set(&k("a"), Entry::new(config("mp"), 1))
        .await
        .unwrap();
    json.set(&k("b"), Entry::new(config("js"), 1))
        .await
        .unwrap();
    // Each reads what the other wrote.
    assert_eq!(theme(&json, "a").await, "mp");
    assert_eq!(theme(&msgpack, "b").await, "js");
}

/// The theme of the value `tier` holds for `key`, which must be there.
async fn theme(tier: &RedisTier<String, Config>, key: &str) -> String {
    let entry = tier.get(&k(key)).await.unwrap().expect("stored");
    entry.value.expect("a value").theme.clone()
}
