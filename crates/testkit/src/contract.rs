//! The contract every authoritative source tier passes (PostgreSQL, SQLite, yours).
//!
//! A source tier stores [`ContractValue`]s under `String` keys and must:
//!
//! * answer a key never written with `Ok(None)` ([`missing_key_is_none`]);
//! * number each key's writes 1, 2, ... and return the number from `write`; answer `get` with
//!   the latest value and version and no expiry ([`writes_number_versions`]);
//! * answer `get_many` in the order asked, with misses and repeated keys
//!   ([`get_many_keeps_order`]);
//! * give 50 concurrent writes to one key the versions 1 to 50, each exactly once
//!   ([`concurrent_writes_get_distinct_versions`]);
//! * refuse `set`, `invalidate` and `clear` with `Error::Unsupported`
//!   ([`cache_operations_are_unsupported`]);
//! * keep keys with any characters apart and return values equal to those written
//!   ([`keys_and_values_round_trip`]);
//! * count its lookups in `stats()` ([`stats_count_lookups`]).
//!
//! Each check takes a fresh, empty tier. [`run_all`] runs them all, asking `make` for a new
//! tier before each:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use tiercache_testkit::{FakeTier, contract};
//!
//! contract::run_all(|| async { Arc::new(FakeTier::source("db")) }).await;
//! # }
//! ```
//!
//! For a failure report that names the broken rule, call the checks from one test each:
//!
//! ```no_run
//! # async fn my_tier() -> tiercache_testkit::FakeTier<String, tiercache_testkit::contract::ContractValue> {
//! #     tiercache_testkit::FakeTier::source("db")
//! # }
//! use std::sync::Arc;
//! use tiercache_testkit::contract;
//!
//! #[tokio::test]
//! async fn concurrent_writes_get_distinct_versions() {
//!     contract::concurrent_writes_get_distinct_versions(Arc::new(my_tier().await)).await;
//! }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiercache_core::{CacheTier, Entry, Error};

/// The value the contract stores: a little of everything JSON has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContractValue {
    /// Text, with characters that need escaping.
    pub name: String,
    /// A number.
    pub n: i64,
    /// A list.
    pub tags: Vec<String>,
    /// A map of floats.
    pub weights: BTreeMap<String, f64>,
    /// An optional field.
    pub note: Option<String>,
}

/// A value whose content depends on `n`.
#[must_use]
pub fn value(n: i64) -> Arc<ContractValue> {
    Arc::new(ContractValue {
        name: format!("value {n}: \"quoted\", ünïcödé, \\ backslash, 'single'"),
        n,
        tags: vec!["a".into(), format!("t{n}")],
        weights: BTreeMap::from([("w".to_owned(), n as f64 / 4.0)]),
        note: (n % 2 == 0).then(|| "even".to_owned()),
    })
}

fn key(k: &str) -> String {
    k.to_owned()
}

/// A key never written is `Ok(None)`.
pub async fn missing_key_is_none<T: CacheTier<String, ContractValue>>(tier: &T) {
    assert!(tier.get(&key("missing")).await.unwrap().is_none());
}

/// Writes number versions 1, 2, ... per key; a get returns the latest value and version, and
/// entries from a source never expire.
pub async fn writes_number_versions<T: CacheTier<String, ContractValue>>(tier: &T) {
    assert_eq!(tier.write(&key("a"), value(1)).await.unwrap(), 1);
    assert_eq!(tier.write(&key("a"), value(2)).await.unwrap(), 2);
    assert_eq!(tier.write(&key("b"), value(3)).await.unwrap(), 1);
    let got = tier.get(&key("a")).await.unwrap().expect("written");
    assert_eq!(got.version, 2);
    assert_eq!(got.expires_at, None);
    assert_eq!(*got.value.expect("a value"), *value(2));
}

/// `get_many` answers in order, with misses and repeated keys.
pub async fn get_many_keeps_order<T: CacheTier<String, ContractValue>>(tier: &T) {
    tier.write(&key("x"), value(10)).await.unwrap();
    tier.write(&key("y"), value(20)).await.unwrap();
    tier.write(&key("y"), value(21)).await.unwrap();
    let keys = [key("y"), key("nope"), key("x"), key("y")];
    let got = tier.get_many(&keys).await.unwrap();
    let summary: Vec<Option<(u64, i64)>> = got
        .iter()
        .map(|e| e.as_ref().map(|e| (e.version, e.value.as_ref().unwrap().n)))
        .collect();
    assert_eq!(summary, [Some((2, 21)), None, Some((1, 10)), Some((2, 21))]);
    assert!(tier.get_many(&[]).await.unwrap().is_empty());
}

/// 50 concurrent writes to one key get versions 1 to 50, each exactly once.
pub async fn concurrent_writes_get_distinct_versions<T>(tier: Arc<T>)
where
    T: CacheTier<String, ContractValue> + 'static,
{
    let mut tasks = Vec::new();
    for n in 0..50 {
        let tier = Arc::clone(&tier);
        tasks.push(tokio::spawn(async move {
            tier.write(&key("hot"), value(n)).await.unwrap()
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("write task"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=50).collect::<Vec<u64>>());
    assert_eq!(tier.get(&key("hot")).await.unwrap().unwrap().version, 50);
}

/// A source does not take the cache operations.
pub async fn cache_operations_are_unsupported<T: CacheTier<String, ContractValue>>(tier: &T) {
    let unsupported = |r: Result<(), Error>| {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    };
    unsupported(
        tier.set(&key("a"), Entry::new(value(1), 1))
            .await
            .map(|_| ()),
    );
    unsupported(tier.invalidate(&key("a"), Some(1)).await);
    unsupported(tier.clear().await);
}

/// Keys with any characters are kept apart, and values come back equal.
pub async fn keys_and_values_round_trip<T: CacheTier<String, ContractValue>>(tier: &T) {
    let long = "x".repeat(256);
    let keys = [
        "a:b",
        "a%3Ab",
        "ünï",
        "with space",
        "quote'\"",
        long.as_str(),
    ];
    for (i, k) in keys.iter().enumerate() {
        tier.write(&key(k), value(i as i64)).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        let got = tier.get(&key(k)).await.unwrap().expect("written");
        assert_eq!(
            (got.version, &*got.value.unwrap()),
            (1, &*value(i as i64)),
            "{k:?}"
        );
    }
}

/// `stats()` counts lookups: a fresh tier asked for one missing and one present key reports one
/// miss and one hit, under its own name.
pub async fn stats_count_lookups<T: CacheTier<String, ContractValue>>(tier: &T) {
    tier.write(&key("here"), value(1)).await.unwrap();
    assert!(tier.get(&key("absent")).await.unwrap().is_none());
    assert!(tier.get(&key("here")).await.unwrap().is_some());
    let stats = tier.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
    assert_eq!(stats.total_requests, 2);
    assert_eq!(stats.name, tier.name());
}

/// Runs every check, each on a new tier from `make`.
pub async fn run_all<T, F, Fut>(mut make: F)
where
    T: CacheTier<String, ContractValue> + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<T>>,
{
    missing_key_is_none(&*make().await).await;
    writes_number_versions(&*make().await).await;
    get_many_keeps_order(&*make().await).await;
    concurrent_writes_get_distinct_versions(make().await).await;
    cache_operations_are_unsupported(&*make().await).await;
    keys_and_values_round_trip(&*make().await).await;
    stats_count_lookups(&*make().await).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeTier;

    #[tokio::test]
    async fn the_fake_source_passes_the_contract() {
        run_all(|| async { Arc::new(FakeTier::<String, ContractValue>::source("db")) }).await;
    }
}
