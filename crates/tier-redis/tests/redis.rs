//! The Redis tier against the real local Redis (`REDIS_URL`), each test under its own prefix.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache_core::{CacheTier, Entry};
use tiercache_redis::{RedisTier, envelope};
use tiercache_testkit::redis_env;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Config {
    theme: String,
    size: u32,
}

fn config(theme: &str) -> Arc<Config> {
    Arc::new(Config {
        theme: theme.into(),
        size: 14,
    })
}

async fn tier(tag: &str) -> (RedisTier<String, Config>, redis::aio::MultiplexedConnection) {
    let client = redis_env::redis_client().await;
    let con = client.get_multiplexed_async_connection().await.unwrap();
    let tier = RedisTier::builder()
        .url(redis_env::redis_url().await)
        .prefix(redis_env::unique_prefix(tag))
        .jitter(0.0)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    (tier, con)
}

fn k(s: &str) -> String {
    s.to_string()
}

async fn raw_get(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap()
}

async fn raw_set(con: &mut redis::aio::MultiplexedConnection, key: &str, bytes: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .arg("PX")
        .arg(60_000)
        .query_async(con)
        .await
        .unwrap();
}

#[tokio::test]
async fn set_get_and_remaining_ttl() {
    let (t, _con) = tier("roundtrip").await;
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

fn t_now() -> tiercache_core::Timestamp {
    tiercache_core::Clock::system().now()
}

#[tokio::test]
async fn an_entry_expiring_sooner_keeps_its_own_expiry() {
    let (t, _con) = tier("capped").await;
    let soon = Entry::new(config("x"), 1).expiring_at(t_now() + Duration::from_secs(5));
    t.set(&k("a"), soon).await.unwrap();
    let e = t.get(&k("a")).await.unwrap().unwrap();
    assert!(e.expires_at.unwrap().saturating_since(t_now()) <= Duration::from_secs(5));
    let past = Entry::new(config("x"), 2).expiring_at(t_now());
    assert!(!t.set(&k("b"), past).await.unwrap(), "nothing to store");
}

#[tokio::test]
async fn entries_expire_in_redis() {
    let client = redis_env::redis_client().await;
    drop(client);
    let t: RedisTier<String, Config> = RedisTier::builder()
        .url(redis_env::redis_url().await)
        .prefix(redis_env::unique_prefix("expiry"))
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

#[tokio::test]
async fn older_versions_never_overwrite_newer_ones() {
    let (t, _con) = tier("versions").await;
    assert!(t.set(&k("a"), Entry::new(config("v5"), 5)).await.unwrap());
    assert!(!t.set(&k("a"), Entry::new(config("v4"), 4)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v5b"), 5)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v6"), 6)).await.unwrap());
    let e = t.get(&k("a")).await.unwrap().unwrap();
    assert_eq!((e.version, e.value.unwrap().theme.as_str()), (6, "v6"));
    assert_eq!(t.stats().rejected_sets, 1);
}

#[tokio::test]
async fn tombstones_refuse_versions_up_to_theirs() {
    let (t, mut con) = tier("tombstones").await;
    t.set(&k("a"), Entry::new(config("v1"), 1)).await.unwrap();
    t.invalidate(&k("a"), Some(1)).await.unwrap();
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(!t.set(&k("a"), Entry::new(config("v1"), 1)).await.unwrap());
    // A tombstone keeps the higher version.
    t.invalidate(&k("a"), Some(0)).await.unwrap();
    let stored = envelope::decode(&raw_get(&mut con, &t.redis_key(&k("a"))).await.unwrap());
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

#[tokio::test]
async fn manual_invalidation_refuses_older_versions_only() {
    let (t, mut con) = tier("manual").await;
    t.set(&k("a"), Entry::new(config("v3"), 3)).await.unwrap();
    t.invalidate(&k("a"), None).await.unwrap();
    assert!(t.get(&k("a")).await.unwrap().is_none());
    assert!(!t.set(&k("a"), Entry::new(config("v2"), 2)).await.unwrap());
    assert!(t.set(&k("a"), Entry::new(config("v3"), 3)).await.unwrap());
    // A not-found at version 0 is simply removed.
    t.set(&k("b"), Entry::absent(0)).await.unwrap();
    t.invalidate(&k("b"), None).await.unwrap();
    assert!(raw_get(&mut con, &t.redis_key(&k("b"))).await.is_none());
    // Nothing held: nothing written.
    t.invalidate(&k("c"), None).await.unwrap();
    assert!(raw_get(&mut con, &t.redis_key(&k("c"))).await.is_none());
}

#[tokio::test]
async fn get_many_keeps_order_and_misses() {
    let (t, _con) = tier("many").await;
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

#[tokio::test]
async fn clear_removes_only_this_prefix() {
    let client = redis_env::redis_client().await;
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let base = redis_env::unique_prefix("clear");
    let url = redis_env::redis_url().await;
    let mine: RedisTier<String, Config> = RedisTier::builder()
        .url(url.clone())
        .prefix(base.clone())
        .build()
        .unwrap();
    // Another cache whose prefix extends ours, and a key that merely starts like ours.
    let sibling: RedisTier<String, Config> = RedisTier::builder()
        .url(url)
        .prefix(format!("{base}x:"))
        .build()
        .unwrap();
    for key in ["a", "b*", "x:1"] {
        mine.set(&k(key), Entry::new(config(key), 1)).await.unwrap();
    }
    sibling
        .set(&k("1"), Entry::new(config("s"), 1))
        .await
        .unwrap();
    let stranger = format!("{base}not:ours");
    raw_set(&mut con, &stranger, b"someone else's").await;

    mine.clear().await.unwrap();
    for key in ["a", "b*", "x:1"] {
        assert!(mine.get(&k(key)).await.unwrap().is_none(), "{key}");
    }
    assert!(sibling.get(&k("1")).await.unwrap().is_some());
    assert_eq!(
        raw_get(&mut con, &stranger).await.as_deref(),
        Some(&b"someone else's"[..])
    );
    let _: () = redis::cmd("DEL")
        .arg(&stranger)
        .query_async(&mut con)
        .await
        .unwrap();
}

#[tokio::test]
async fn corrupt_bytes_are_a_miss_deleted_and_counted() {
    let (t, mut con) = tier("corrupt").await;
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
        raw_set(&mut con, &key, bytes).await;
        assert!(t.get(&k(name)).await.unwrap().is_none(), "{name}");
        assert!(raw_get(&mut con, &key).await.is_none(), "{name} deleted");
    }
    assert_eq!(t.stats().corrupt, cases.len() as u64);
    // The set script overwrites what it cannot parse.
    let key = t.redis_key(&k("over"));
    raw_set(&mut con, &key, b"garbage").await;
    assert!(
        t.set(&k("over"), Entry::new(config("ok"), 1))
            .await
            .unwrap()
    );
    assert_eq!(t.get(&k("over")).await.unwrap().unwrap().version, 1);
}

#[tokio::test]
async fn large_values_are_compressed_and_round_trip() {
    let (t, mut con) = tier("compress").await;
    let big = Arc::new(Config {
        theme: "t".repeat(20_000),
        size: 1,
    });
    t.set(&k("big"), Entry::new(big.clone(), 1)).await.unwrap();
    let raw = raw_get(&mut con, &t.redis_key(&k("big"))).await.unwrap();
    assert!(raw.len() < 2_000, "stored {} bytes", raw.len());
    assert_eq!(
        *t.get(&k("big")).await.unwrap().unwrap().value.unwrap(),
        *big
    );
}

#[tokio::test]
async fn keys_with_separators_and_globs_do_not_collide() {
    let (t, _con) = tier("keys").await;
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

#[tokio::test]
async fn an_unreachable_redis_fails_fast_and_transiently() {
    // Nothing listens on port 1. The tier builds (a service must start while Redis is down).
    let t: RedisTier<String, Config> = RedisTier::builder()
        .url("redis://127.0.0.1:1/")
        .build()
        .unwrap();
    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(5), t.get(&k("a")))
            .await
            .expect("a down Redis must not hang a call")
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        let err = t
            .set(&k("a"), Entry::new(config("x"), 1))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
    }
    assert!(!t.is_connected());
    assert!(t.stats().errors >= 6);
}

#[tokio::test]
async fn both_codecs_round_trip_and_read_each_other() {
    let (msgpack, _con) = tier("codec_mp").await;
    let json: RedisTier<String, Config> = RedisTier::builder()
        .url(redis_env::redis_url().await)
        .prefix(msgpack.prefix().to_string())
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
    assert_eq!(
        json.get(&k("a"))
            .await
            .unwrap()
            .unwrap()
            .value
            .unwrap()
            .theme,
        "mp"
    );
    assert_eq!(
        msgpack
            .get(&k("b"))
            .await
            .unwrap()
            .unwrap()
            .value
            .unwrap()
            .theme,
        "js"
    );
}
