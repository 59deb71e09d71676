//! The table's migrations and the names of its database objects, shared by the tier and its
//! change feed's follower (each runs them once before its first statement).

use std::borrow::Cow;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tiercache_core::{Error, Result};
use tokio::sync::OnceCell;

use crate::error::map_error;

/// The migrations, in order (`include_str!`: no proc-macro build of sqlx's drivers).
const EMBEDDED: &[tiercache_sql::Embedded] = &tiercache_sql::embedded([
    (
        "create entries",
        include_str!("../migrations/0001_create_entries.sql"),
    ),
    (
        "versions and changes",
        include_str!("../migrations/0002_versions_and_changes.sql"),
    ),
    (
        "feed off the commit path",
        include_str!("../migrations/0003_feed_off_the_commit_path.sql"),
    ),
    (
        "logical decoding",
        include_str!("../migrations/0004_logical_decoding.sql"),
    ),
    ("history", include_str!("../migrations/0005_history.sql")),
]);

/// One table's migrations, run once per tier (and retried on later calls if they failed).
pub(crate) struct Migrations {
    pub(crate) options: PgConnectOptions,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) name: String,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    /// Whether the first use applies what is missing (else it only checks that nothing is,
    /// for a role that may not create objects).
    pub(crate) apply_on_first_use: bool,
    /// Set once the migrations ran: a snapshot taken then, before the tier's first statement
    /// (see [`Migrations::start`]).
    pub(crate) done: OnceCell<String>,
}

impl Migrations {
    /// Applies what the table has not had, once it succeeded never again.
    pub(crate) async fn run(&self) -> Result<()> {
        self.start_with(true).await.map(|_| ())
    }

    /// Runs the migrations once and returns where the tier's history starts: a snapshot
    /// (`pg_snapshot` text) taken after they ran and before the tier's first statement. Every
    /// change that commits after anything this tier reads is invisible in it, so a follower
    /// that starts late still catches up on every change that could have replaced what its
    /// chain cached (see the `feed` module).
    pub(crate) async fn start(&self) -> Result<String> {
        self.start_with(self.apply_on_first_use).await
    }

    async fn start_with(&self, apply: bool) -> Result<String> {
        self.done
            .get_or_try_init(|| async {
                // A standby replays the primary's migrations; it can apply none of its own.
                if apply && !self.in_recovery().await? {
                    self.apply().await?;
                } else {
                    self.check().await?;
                }
                self.horizon().await
            })
            .await
            .cloned()
    }

    /// Checks that every migration was applied, without applying any (the tier was built with
    /// `run_migrations(false)`: its role may only read and write).
    async fn check(&self) -> Result<()> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(self.options.clone());
        let applied: std::result::Result<Vec<i64>, sqlx::Error> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT version FROM \"{}\".\"{}\" WHERE success",
                self.schema,
                bookkeeping_table(&self.table)
            )))
            .fetch_all(&pool)
            .await;
        pool.close().await;
        let applied = match applied {
            Ok(applied) => applied,
            // No bookkeeping table: nothing was ever applied.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(map_error(&self.name, self.statement_timeout, e)),
        };
        match EMBEDDED.iter().find(|m| !applied.contains(&m.version)) {
            None => Ok(()),
            Some(m) => Err(Error::backend(
                &self.name,
                NotMigrated {
                    table: format!("{}.{}", self.schema, self.table),
                    version: m.version,
                },
            )),
        }
    }

    /// Whether the server is a standby in recovery.
    async fn in_recovery(&self) -> Result<bool> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(self.options.clone());
        let found = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&pool)
            .await;
        pool.close().await;
        found.map_err(|e| map_error(&self.name, self.statement_timeout, e))
    }

    async fn horizon(&self) -> Result<String> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(self.options.clone());
        let snapshot = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&pool)
            .await;
        pool.close().await;
        snapshot.map_err(|e| map_error(&self.name, self.statement_timeout, e))
    }

    async fn apply(&self) -> Result<()> {
        let names = Names::new(&self.schema, &self.table);
        let mut migrator = tiercache_sql::templated(EMBEDDED, |sql| names.fill(sql));
        migrator.create_schema(Cow::Owned(self.schema.clone()));
        migrator.dangerous_set_table_name(Cow::Owned(format!(
            "\"{}\".\"{}\"",
            self.schema,
            bookkeeping_table(&self.table)
        )));
        // A connection of its own, closed afterwards: sqlx's migrator returns early on an error
        // without releasing its session-level advisory lock, and a connection of the tier's pool
        // would keep holding it, blocking every later migration in the database. (A pool of one
        // rather than a bare connection: `Migrator::run` on `&mut PgConnection` makes this
        // future not `Send`.)
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(self.options.clone());
        let result = migrator.run(&pool).await;
        pool.close().await;
        result.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => {
                map_error(&self.name, self.statement_timeout, inner)
            }
            other => Error::backend(&self.name, other),
        })
    }
}

/// A tier that may not migrate found a migration missing.
#[derive(Debug, thiserror::Error)]
#[error(
    "{table} lacks migration {version}: run `userconfig migrate` (or `PostgresSource::migrate`) \
     with a role that may create tables, or let this tier migrate (`run_migrations(true)`)"
)]
pub(crate) struct NotMigrated {
    table: String,
    version: i64,
}

pub(crate) use tiercache_sql::MAX_IDENTIFIER;

/// The table that records which migrations `table` has had: `_tiercache_migrations_<table>`,
/// or, when that is longer than an identifier may be, the first 24 characters of the table and
/// a hash of the whole name (stable across releases: FNV-1a).
pub(crate) fn bookkeeping_table(table: &str) -> String {
    const PREFIX: &str = "_tiercache_migrations_";
    if PREFIX.len() + table.len() <= MAX_IDENTIFIER {
        return format!("{PREFIX}{table}");
    }
    // The table is ASCII (validated), so slicing at 24 is on a character boundary.
    format!("{PREFIX}{}_{:016x}", &table[..24], fnv(table))
}

/// FNV-1a of `text` (stable across releases: it names database objects).
pub(crate) fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The name of an object that belongs to `table` (its sequence, log, functions):
/// `<table><suffix>`, or, when that is longer than an identifier may be, the first 24
/// characters of the table, a hash of the whole name and the suffix.
fn derived(table: &str, suffix: &str) -> String {
    if table.len() + suffix.len() <= MAX_IDENTIFIER {
        return format!("{table}{suffix}");
    }
    // The table is ASCII (validated), so slicing at 24 is on a character boundary.
    format!("{}_{:016x}{suffix}", &table[..24], fnv(table))
}

/// The database objects of one table, quoted and schema-qualified, as the migrations and the
/// statements name them.
pub(crate) struct Names {
    /// `{placeholder}` and its replacement.
    pairs: Vec<(&'static str, String)>,
}

impl Names {
    pub(crate) fn new(schema: &str, table: &str) -> Self {
        let q = |name: &str| format!("\"{schema}\".\"{name}\"");
        let pairs = vec![
            ("{table}", q(table)),
            ("{versions}", q(&derived(table, "_versions"))),
            ("{changes}", q(&derived(table, "_changes"))),
            (
                "{changes_txid}",
                format!("\"{}\"", derived(table, "_changes_txid")),
            ),
            (
                "{changes_at}",
                format!("\"{}\"", derived(table, "_changes_at")),
            ),
            ("{feed}", q(&derived(table, "_feed"))),
            ("{history}", q(&derived(table, "_history"))),
            (
                "{history_at}",
                format!("\"{}\"", derived(table, "_history_at")),
            ),
            ("{emit}", q(&derived(table, "_emit"))),
            ("{stamp}", q(&derived(table, "_stamp"))),
            ("{announce}", q(&derived(table, "_announce"))),
            ("{truncated}", q(&derived(table, "_truncated"))),
            ("{write_fn}", q(&derived(table, "_write"))),
            ("{delete_fn}", q(&derived(table, "_delete"))),
            ("{write_by_fn}", q(&derived(table, "_write_by"))),
            ("{delete_by_fn}", q(&derived(table, "_delete_by"))),
            ("{channel}", channel(schema, table)),
        ];
        Names { pairs }
    }

    pub(crate) fn get(&self, placeholder: &str) -> &str {
        self.pairs
            .iter()
            .find(|(p, _)| *p == placeholder)
            .map(|(_, name)| name.as_str())
            .expect("a known placeholder")
    }

    /// `sql` with every placeholder replaced.
    pub(crate) fn fill(&self, sql: &str) -> String {
        self.pairs
            .iter()
            .fold(sql.to_owned(), |sql, (p, name)| sql.replace(p, name))
    }
}

/// The LISTEN/NOTIFY channel of a table: `tiercache_` and a hash of its qualified name (a
/// channel is an identifier; this one fits whatever the names' lengths).
pub(crate) fn channel(schema: &str, table: &str) -> String {
    format!("tiercache_{:016x}", fnv(&format!("{schema}.{table}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn bookkeeping_tables_fit_in_an_identifier_and_stay_apart() {
        assert_eq!(
            bookkeeping_table("tiercache_entries"),
            "_tiercache_migrations_tiercache_entries"
        );
        let long_a = format!("{}a", "t".repeat(62));
        let long_b = format!("{}b", "t".repeat(62));
        let (a, b) = (bookkeeping_table(&long_a), bookkeeping_table(&long_b));
        assert_ne!(a, b);
        assert!(
            a.len() <= MAX_IDENTIFIER && tiercache_sql::valid_identifier(&a),
            "{a}"
        );
        assert_eq!(a, bookkeeping_table(&long_a), "stable");
        assert_eq!(bookkeeping_table(&"t".repeat(41)).len(), 63);
    }

    /// Every file in `migrations/` is embedded, in order: a new migration file that is not
    /// added to `EMBEDDED` would never run.
    #[test]
    fn every_migration_file_is_embedded_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        tiercache_sql::check_embedded(&dir, super::EMBEDDED).unwrap();
    }
}
