//! The contract every [`Source`] passes (PostgreSQL, SQLite, the fake, yours).
//!
//! A source stores [`ContractValue`]s under `String` keys and must:
//!
//! * answer a key never written with `Ok(None)` ([`missing_key_is_none`]);
//! * give each change of a key a version greater than every earlier one and return it from
//!   `write`; answer `get` with the latest value and version and no expiry
//!   ([`writes_increase_versions`]);
//! * answer `get_many` in the order asked, with misses and repeated keys
//!   ([`get_many_keeps_order`]);
//! * give 50 concurrent writes to one key 50 distinct versions, the last one stored
//!   ([`concurrent_writes_get_distinct_versions`]);
//! * commit nothing for a write of the stored value ([`unchanged_writes_commit_nothing`]);
//! * refuse a conditional write or delete whose expected version is not the stored one, with
//!   the stored version, and let exactly one of several racing ones through
//!   ([`conditional_changes_check_the_version`], [`racing_conditional_writes_one_wins`]);
//! * delete with a version of its own, so that a key written again after a delete gets a
//!   greater version than before ([`deletes_are_changes`]);
//! * keep keys with any characters apart and return values equal to those written
//!   ([`keys_and_values_round_trip`]);
//! * count its lookups in `stats()` ([`stats_count_lookups`]).
//!
//! Each check takes a fresh, empty source. [`run_all`] runs them all, asking `make` for a new
//! source before each:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use tiercache_testkit::{FakeSource, contract};
//!
//! contract::run_all(|| async { Arc::new(FakeSource::new("db")) }).await;
//! # }
//! ```
//!
//! For a failure report that names the broken rule, call the checks from one test each:
//!
//! ```no_run
//! # async fn my_source() -> tiercache_testkit::FakeSource<String, tiercache_testkit::contract::ContractValue> {
//! #     tiercache_testkit::FakeSource::new("db")
//! # }
//! use std::sync::Arc;
//! use tiercache_testkit::contract;
//!
//! #[tokio::test]
//! async fn concurrent_writes_get_distinct_versions() {
//!     contract::concurrent_writes_get_distinct_versions(Arc::new(my_source().await)).await;
//! }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiercache_core::{Source, Version, Written};

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

/// Writes `value(n)` unconditionally and returns the new version (the write must change).
async fn write<T: Source<String, ContractValue> + ?Sized>(source: &T, k: &str, n: i64) -> Version {
    match source.write(&key(k), value(n), None).await.unwrap() {
        Written::Changed(version) => version,
        other => panic!("a write of a new value must commit, got {other:?}"),
    }
}

/// A key never written is `Ok(None)`.
pub async fn missing_key_is_none<T: Source<String, ContractValue>>(source: &T) {
    assert!(source.get(&key("missing")).await.unwrap().is_none());
}

/// Each write of a key gets a greater version than the one before; a get returns the latest
/// value and version, and entries from a source never expire.
pub async fn writes_increase_versions<T: Source<String, ContractValue>>(source: &T) {
    let a1 = write(source, "a", 1).await;
    let a2 = write(source, "a", 2).await;
    let b1 = write(source, "b", 3).await;
    assert!(a1 > 0 && a2 > a1, "versions {a1}, {a2}");
    assert!(b1 > 0);
    let got = source.get(&key("a")).await.unwrap().expect("written");
    assert_eq!(got.version, a2);
    assert_eq!(got.expires_at, None);
    assert_eq!(*got.value.expect("a value"), *value(2));
}

/// `get_many` answers in order, with misses and repeated keys.
pub async fn get_many_keeps_order<T: Source<String, ContractValue>>(source: &T) {
    let x = write(source, "x", 10).await;
    write(source, "y", 20).await;
    let y = write(source, "y", 21).await;
    let keys = [key("y"), key("nope"), key("x"), key("y")];
    let got = source.get_many(&keys).await.unwrap();
    let summary: Vec<Option<(u64, i64)>> = got
        .iter()
        .map(|e| e.as_ref().map(|e| (e.version, e.value.as_ref().unwrap().n)))
        .collect();
    assert_eq!(summary, [Some((y, 21)), None, Some((x, 10)), Some((y, 21))]);
    assert!(source.get_many(&[]).await.unwrap().is_empty());
}

/// 50 concurrent writes to one key get 50 distinct versions; the greatest is stored.
pub async fn concurrent_writes_get_distinct_versions<T>(source: Arc<T>)
where
    T: Source<String, ContractValue> + 'static,
{
    let mut tasks = Vec::new();
    for n in 0..50 {
        let source = Arc::clone(&source);
        tasks.push(tokio::spawn(async move { write(&*source, "hot", n).await }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("write task"));
    }
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 50, "every write its own version");
    let stored = source.get(&key("hot")).await.unwrap().unwrap().version;
    assert_eq!(Some(&stored), versions.last());
}

/// A write of the value already stored commits nothing: the same version, no change.
pub async fn unchanged_writes_commit_nothing<T: Source<String, ContractValue>>(source: &T) {
    let v = write(source, "same", 5).await;
    let again = source.write(&key("same"), value(5), None).await.unwrap();
    assert_eq!(again, Written::Unchanged(v));
    let conditional = source.write(&key("same"), value(5), Some(v)).await.unwrap();
    assert_eq!(conditional, Written::Unchanged(v));
    assert_eq!(source.get(&key("same")).await.unwrap().unwrap().version, v);
    let next = write(source, "same", 6).await;
    assert!(next > v, "{next} after {v}");
}

/// A conditional write or delete goes through only at the expected version (0: nothing
/// stored); a refused one reports the stored version and changes nothing.
pub async fn conditional_changes_check_the_version<T: Source<String, ContractValue>>(source: &T) {
    let k = key("cas");
    let err = source.write(&k, value(1), Some(7)).await.unwrap_err();
    assert_eq!(err.conflict(), Some(0), "{err}");
    let v1 = match source.write(&k, value(1), Some(0)).await.unwrap() {
        Written::Changed(v) => v,
        other => panic!("{other:?}"),
    };
    let err = source.write(&k, value(2), Some(0)).await.unwrap_err();
    assert_eq!(err.conflict(), Some(v1), "{err}");
    let err = source
        .write(&k, value(2), Some(v1 + 1000))
        .await
        .unwrap_err();
    assert_eq!(err.conflict(), Some(v1), "{err}");
    let err = source.delete(&k, Some(v1 + 1000)).await.unwrap_err();
    assert_eq!(err.conflict(), Some(v1), "{err}");
    let got = source.get(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.version, got.value.unwrap().n),
        (v1, 1),
        "refused changes change nothing"
    );
    let v2 = source.write(&k, value(2), Some(v1)).await.unwrap();
    assert!(v2.changed() && v2.version() > v1, "{v2:?}");
    let gone = source.delete(&k, Some(v2.version())).await.unwrap();
    assert!(gone.changed() && gone.version() > v2.version(), "{gone:?}");
}

/// Of 10 conditional writes racing from the same version, exactly one commits; the others
/// are conflicts reporting its version.
pub async fn racing_conditional_writes_one_wins<T>(source: Arc<T>)
where
    T: Source<String, ContractValue> + 'static,
{
    let start = write(&*source, "race", 0).await;
    let mut tasks = Vec::new();
    for n in 1..=10 {
        let source = Arc::clone(&source);
        tasks.push(tokio::spawn(async move {
            source.write(&key("race"), value(n), Some(start)).await
        }));
    }
    let mut won = Vec::new();
    let mut conflicts = Vec::new();
    for t in tasks {
        match t.await.expect("write task") {
            Ok(written) => won.push(written),
            Err(error) => conflicts.push(error.conflict().expect("a conflict")),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let winner = won[0].version();
    assert!(winner > start);
    assert!(
        conflicts.iter().all(|&c| c == winner),
        "{conflicts:?} vs {winner}"
    );
}

/// A delete is a change with a version of its own: the key reads as missing, a second delete
/// changes nothing, and a write afterwards gets a greater version than the delete.
pub async fn deletes_are_changes<T: Source<String, ContractValue>>(source: &T) {
    let k = key("gone");
    assert_eq!(
        source.delete(&k, None).await.unwrap(),
        Written::Unchanged(0)
    );
    let v = write(source, "gone", 1).await;
    let deleted = source.delete(&k, None).await.unwrap();
    assert!(
        deleted.changed() && deleted.version() > v,
        "{deleted:?} after {v}"
    );
    assert!(source.get(&k).await.unwrap().is_none());
    assert_eq!(
        source.delete(&k, None).await.unwrap(),
        Written::Unchanged(0)
    );
    let again = source.write(&k, value(2), Some(0)).await.unwrap();
    assert!(
        again.changed() && again.version() > deleted.version(),
        "{again:?}"
    );
    assert_eq!(
        source.get(&k).await.unwrap().unwrap().version,
        again.version()
    );
}

/// Keys with any characters are kept apart, and values come back equal.
pub async fn keys_and_values_round_trip<T: Source<String, ContractValue>>(source: &T) {
    let long = "x".repeat(256);
    let keys = [
        "a:b",
        "a%3Ab",
        "ünï",
        "with space",
        "quote'\"",
        long.as_str(),
    ];
    let mut versions = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        versions.push(write(source, k, i as i64).await);
    }
    for (i, k) in keys.iter().enumerate() {
        let got = source.get(&key(k)).await.unwrap().expect("written");
        assert_eq!(
            (got.version, &*got.value.unwrap()),
            (versions[i], &*value(i as i64)),
            "{k:?}"
        );
    }
}

/// `stats()` counts lookups: a fresh source asked for one missing and one present key
/// reports one miss and one hit, under its own name.
pub async fn stats_count_lookups<T: Source<String, ContractValue>>(source: &T) {
    write(source, "here", 1).await;
    assert!(source.get(&key("absent")).await.unwrap().is_none());
    assert!(source.get(&key("here")).await.unwrap().is_some());
    let stats = source.stats();
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
    assert_eq!(stats.total_requests, 2);
    assert_eq!(stats.name, source.name());
}

/// Runs every check, each on a new source from `make`.
pub async fn run_all<T, F, Fut>(mut make: F)
where
    T: Source<String, ContractValue> + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<T>>,
{
    missing_key_is_none(&*make().await).await;
    writes_increase_versions(&*make().await).await;
    get_many_keeps_order(&*make().await).await;
    concurrent_writes_get_distinct_versions(make().await).await;
    unchanged_writes_commit_nothing(&*make().await).await;
    conditional_changes_check_the_version(&*make().await).await;
    racing_conditional_writes_one_wins(make().await).await;
    deletes_are_changes(&*make().await).await;
    keys_and_values_round_trip(&*make().await).await;
    stats_count_lookups(&*make().await).await;
}

/// A source that keeps history returns every change of a key, newest first, with its value
/// (none for a delete); pages back with `before`; reads any kept version back, the current
/// one included; keeps nothing of an unchanged write; and purges a key's history alone.
pub async fn history_keeps_every_change<T: Source<String, ContractValue>>(source: &T) {
    let k = key("history");
    let v1 = write(source, "history", 1).await;
    assert_eq!(
        source.write(&k, value(1), None).await.unwrap(),
        Written::Unchanged(v1),
        "an unchanged write"
    );
    let v2 = write(source, "history", 2).await;
    let gone = source.delete(&k, None).await.unwrap().version();
    let v4 = write(source, "history", 4).await;
    write(source, "other", 9).await;
    let all = source.history(&k, None, 10).await.unwrap();
    let versions: Vec<_> = all.iter().map(|r| r.version).collect();
    assert_eq!(versions, [v4, gone, v2, v1], "newest first, nothing twice");
    let values: Vec<_> = all.iter().map(|r| r.value.as_deref().cloned()).collect();
    assert_eq!(
        values,
        [
            Some((*value(4)).clone()),
            None,
            Some((*value(2)).clone()),
            Some((*value(1)).clone())
        ]
    );
    assert!(
        all.windows(2).all(|w| w[0].at >= w[1].at),
        "times go back: {all:?}"
    );
    let page = source.history(&k, Some(gone), 1).await.unwrap();
    assert_eq!(page.iter().map(|r| r.version).collect::<Vec<_>>(), [v2]);
    for (version, expected) in [(v1, Some(value(1))), (v4, Some(value(4))), (gone, None)] {
        let got = source.revision(&k, version).await.unwrap().expect("kept");
        assert_eq!((got.version, got.value), (version, expected), "{version}");
    }
    assert!(source.revision(&k, v4 + 1000).await.unwrap().is_none());
    assert_eq!(source.purge_history(&k).await.unwrap(), 4);
    assert!(source.history(&k, None, 10).await.unwrap().is_empty());
    assert_eq!(
        source.history(&key("other"), None, 10).await.unwrap().len(),
        1,
        "another key's history stays"
    );
    // The current version is still read back: the table holds it.
    assert_eq!(
        source.revision(&k, v4).await.unwrap().map(|r| r.version),
        Some(v4)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeSource;

    #[tokio::test]
    async fn the_fake_source_passes_the_contract() {
        run_all(|| async { Arc::new(FakeSource::<String, ContractValue>::new("db")) }).await;
    }
}
