//! What tiercache's SQL sources (`tiercache-postgres`, `tiercache-sqlite`) share: decoding a
//! stored row into an [`Entry`], answering a batch in the order asked, the counters behind
//! their [`TierStats`], identifier checks, and the templating of their embedded migrations
//! (the SQL names the table's objects in braces, replaced by validated, quoted names).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};
use tiercache_core::{Counter, Entry, Error, Result, Revision, TierStats};

/// A stored value that does not decode, naming its key.
#[derive(Debug, thiserror::Error)]
#[error("stored value for key `{key}` does not decode: {reason}")]
pub struct Undecodable {
    /// The key.
    pub key: String,
    /// The decoder's message: where and why, never the data.
    pub reason: String,
}

/// The counters of a SQL source.
#[derive(Debug, Default)]
pub struct RowStats {
    /// Keys found.
    pub hits: Counter,
    /// Keys not found.
    pub misses: Counter,
    /// Failed calls.
    pub errors: Counter,
    /// Rows that did not decode.
    pub corrupt: Counter,
}

impl RowStats {
    /// The source's [`TierStats`] under `name`.
    #[must_use]
    pub fn tier_stats(&self, name: &str) -> TierStats {
        TierStats::new(name.to_owned(), self.hits.get(), self.misses.get())
            .with_errors(self.errors.get())
            .with_housekeeping(0, self.corrupt.get(), 0)
    }
}

/// Decodes the JSON text stored for `key` at `version`: an entry that does not expire, or
/// [`Error::Corrupt`] naming the key (never a default: a later update would destroy the data).
///
/// # Errors
/// [`Error::Corrupt`] when `json` does not decode into `V`.
pub fn decode<V: DeserializeOwned>(
    tier: &str,
    stats: &RowStats,
    key: &str,
    json: &str,
    version: i64,
) -> Result<Entry<V>> {
    let value: V = serde_json::from_str(json).map_err(|e| {
        stats.corrupt.incr();
        Error::corrupt(
            tier,
            Undecodable {
                key: key.to_owned(),
                // Where and why, never the data (it may be a user's configuration).
                reason: format!(
                    "{:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            },
        )
    })?;
    Ok(Entry::new(
        Arc::new(value),
        u64::try_from(version).unwrap_or(0),
    ))
}

/// A past version of `key` read back from a history table: the stored JSON (`None`: a
/// delete), its version, when it was written (microseconds since the Unix epoch) and by whom.
///
/// # Errors
/// [`Error::Corrupt`] when the JSON does not decode.
pub fn revision<V: DeserializeOwned>(
    tier: &str,
    stats: &RowStats,
    key: &str,
    row: (Option<String>, i64, i64, Option<String>),
) -> Result<Revision<V>> {
    let (json, version, at_micros, author) = row;
    let value = match json {
        Some(json) => decode::<V>(tier, stats, key, &json, version)?.value,
        None => None,
    };
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_micros(u64::try_from(at_micros).unwrap_or(0));
    Ok(Revision::new(
        u64::try_from(version).unwrap_or(0),
        value,
        at,
        author,
    ))
}

/// A row for `key` if one was found (counted as a hit or a miss), decoded.
///
/// # Errors
/// [`Error::Corrupt`] when the row does not decode.
pub fn found<V: DeserializeOwned>(
    tier: &str,
    stats: &RowStats,
    key: &str,
    row: Option<(&str, i64)>,
) -> Result<Option<Entry<V>>> {
    match row {
        Some((json, version)) => {
            stats.hits.incr();
            decode(tier, stats, key, json, version).map(Some)
        }
        None => {
            stats.misses.incr();
            Ok(None)
        }
    }
}

/// A batch's answer in the order asked (`keys` may repeat), from the rows found: key, stored
/// JSON, version.
///
/// # Errors
/// [`Error::Corrupt`] for the first row that does not decode.
pub fn in_order<V: DeserializeOwned>(
    tier: &str,
    stats: &RowStats,
    keys: &[String],
    rows: impl IntoIterator<Item = (String, String, i64)>,
) -> Result<Vec<Option<Entry<V>>>> {
    let found: HashMap<String, (String, i64)> = rows
        .into_iter()
        .map(|(key, json, version)| (key, (json, version)))
        .collect();
    keys.iter()
        .map(|key| {
            let row = found.get(key).map(|(json, v)| (json.as_str(), *v));
            self::found(tier, stats, key, row)
        })
        .collect()
}

/// `value` as the JSON text a source stores.
///
/// # Errors
/// [`Error::InvalidInput`] when it does not serialize (before any I/O).
pub fn to_json<V: Serialize>(value: &V) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::InvalidInput(format!("value does not serialize: {e}")))
}

/// Whether `name` is a plain identifier: `^[a-z_][a-z0-9_]{0,62}$` (PostgreSQL truncates
/// longer names to 63 bytes; the same rule keeps SQLite's names plain).
#[must_use]
pub fn valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_IDENTIFIER
}

/// The longest identifier, in bytes (PostgreSQL's).
pub const MAX_IDENTIFIER: usize = 63;

/// A migration compiled into a source's crate with `include_str!` (not `sqlx::migrate!`, whose
/// proc-macro build pulls in every database driver's macros).
#[derive(Debug, Clone, Copy)]
pub struct Embedded {
    /// Its number, applied in increasing order.
    pub version: i64,
    /// Its name in the bookkeeping table (what `sqlx::migrate!` derives from the file name).
    pub description: &'static str,
    /// Its SQL, with the table's objects named in braces.
    pub sql: &'static str,
}

/// A source's migrations from their names and SQL, in order (`include_str!` of its
/// `migrations/` files): each is numbered from 1 and named as `sqlx::migrate!` would name its
/// file (`0002_versions_and_changes.sql` is "versions and changes").
#[must_use]
pub const fn embedded<const N: usize>(files: [(&'static str, &'static str); N]) -> [Embedded; N] {
    let mut out = [Embedded {
        version: 0,
        description: "",
        sql: "",
    }; N];
    let mut i = 0;
    while i < N {
        out[i] = Embedded {
            version: i as i64 + 1,
            description: files[i].0,
            sql: files[i].1,
        };
        i += 1;
    }
    out
}

/// Whether `embedded` holds every `.sql` file of `dir`, in order, each named
/// `<version, four digits>_<description with _ for spaces>.sql`: a new migration file that is
/// not embedded would never run (each source's tests call this on its `migrations/`).
///
/// # Errors
/// What does not match.
pub fn check_embedded(dir: &std::path::Path, embedded: &[Embedded]) -> Result<(), String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let expected: Vec<String> = embedded
        .iter()
        .map(|m| format!("{:04}_{}.sql", m.version, m.description.replace(' ', "_")))
        .collect();
    if files == expected {
        Ok(())
    } else {
        Err(format!(
            "migrations/ holds {files:?}, the code embeds {expected:?}"
        ))
    }
}

/// `embedded`'s migrations with the names in their SQL filled in by `fill`, each checksummed
/// on the SQL it runs (so that two tables' migrations are told apart).
#[must_use]
pub fn templated(embedded: &[Embedded], fill: impl Fn(&str) -> String) -> Migrator {
    let migrations: Vec<Migration> = embedded
        .iter()
        .map(|m| {
            Migration::new(
                m.version,
                m.description.into(),
                MigrationType::Simple,
                AssertSqlSafe(fill(m.sql)).into_sql_str(),
                false,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
}

/// The text of an error and its sources (the core's, re-exported for the SQL sources' callers).
pub use tiercache_core::util::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(valid_identifier("tiercache_entries"));
        assert!(valid_identifier("_x1"));
        assert!(valid_identifier(&"a".repeat(63)));
        assert!(!valid_identifier(&"a".repeat(64)));
        assert!(!valid_identifier("1x"));
        assert!(!valid_identifier(""));
        assert!(!valid_identifier("a-b"));
        assert!(!valid_identifier("Public"));
        assert!(!valid_identifier("x\"; drop table y; --"));
    }

    #[test]
    fn batches_answer_in_the_order_asked_and_count() {
        let stats = RowStats::default();
        let keys = ["b", "a", "zz", "b"].map(String::from);
        let rows = vec![
            ("a".to_owned(), "1".to_owned(), 3),
            ("b".to_owned(), "2".to_owned(), 5),
        ];
        let got: Vec<Option<Entry<u32>>> = in_order("db", &stats, &keys, rows).unwrap();
        let summary: Vec<Option<(u32, u64)>> = got
            .iter()
            .map(|e| e.as_ref().map(|e| (**e.value.as_ref().unwrap(), e.version)))
            .collect();
        assert_eq!(summary, [Some((2, 5)), Some((1, 3)), None, Some((2, 5))]);
        assert_eq!((stats.hits.get(), stats.misses.get()), (3, 1));
    }

    #[test]
    fn a_row_that_does_not_decode_names_its_key_not_its_value() {
        let stats = RowStats::default();
        let err = decode::<u32>("db", &stats, "alice", "\"s3cret\"", 1).unwrap_err();
        assert!(err.is_corrupt());
        let text = error_chain(&err);
        assert!(
            text.contains("`alice`") && !text.contains("s3cret"),
            "{text}"
        );
        assert_eq!(stats.corrupt.get(), 1);
        assert_eq!(stats.tier_stats("db").corrupt, 1);
    }
}
