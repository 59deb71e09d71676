//! Operators' calls: migrations, the grants a service role needs, pruning the change log by
//! hand.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::AssertSqlSafe;
use tiercache_core::{Error, Result, StorageKey};

use crate::PostgresSource;
use crate::error::map_error;
use crate::feed;

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> PostgresSource<K, V> {
    /// Prunes the change log now (the elected follower does it by itself once a minute): the
    /// entries that every follower cut off for less than the retention
    /// ([`change_retention`](crate::PostgresSourceBuilder::change_retention)) has seen are
    /// deleted, in batches, after what they covered is recorded, so that a follower cut off for
    /// longer empties its caches instead of missing changes. Returns the entries deleted (0
    /// before an elected follower has held its cursor for a whole retention).
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the server cannot be reached.
    pub async fn prune_changes(&self) -> Result<u64> {
        self.migrations.start().await?;
        let explain = |e| map_error(&self.name, self.statement_timeout, e);
        let mut conn = self.pool.acquire().await.map_err(explain)?;
        let state = feed::state(&mut conn, &self.feed_sql)
            .await
            .map_err(explain)?;
        let now = feed::unix_now();
        let Some(through) = feed::prunable(&state.history, now, self.change_retention) else {
            return Ok(0);
        };
        feed::prune(&mut conn, &self.feed_sql, through, std::time::Duration::MAX)
            .await
            .map_err(explain)
    }

    /// Creates the schema and the table if they are missing, and applies any migration the
    /// table has not had. Idempotent; concurrent callers, in this process or others, are
    /// serialized by sqlx's advisory lock. Calls run this once by themselves before their
    /// first statement, so calling it is optional: it reports problems (permissions, say)
    /// at start-up rather than on the first request.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the server cannot be reached, [`Error::Backend`] if a
    /// migration fails or was changed after it was applied.
    pub async fn migrate(&self) -> Result<()> {
        self.migrations.run().await
    }

    /// What a service's role needs on this tier's objects, and nothing more: to read and write
    /// the table (through its functions), have versions numbered, log changes and follow the
    /// log (read it, prune it), and check the migrations. Applied with the privileges of this
    /// tier's own role (the migrations' owner). See docs/operations.md.
    ///
    /// # Errors
    /// [`Error::Config`] if `role` is not a plain identifier (lower-case letters, digits and
    /// `_`); the database's refusal otherwise.
    pub async fn grant_to(&self, role: &str) -> Result<()> {
        if !tiercache_sql::valid_identifier(role) {
            return Err(Error::Config(format!(
                "role {role:?} must be a lower-case identifier of letters, digits and _"
            )));
        }
        self.migrate().await?;
        let names = self.names();
        let role = format!("\"{role}\"");
        let statements = vec![
            format!("GRANT USAGE ON SCHEMA \"{}\" TO {role}", self.schema),
            names.fill(&format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {{table}} TO {role}"
            )),
            names.fill(&format!(
                "GRANT SELECT, INSERT, DELETE ON {{changes}} TO {role}"
            )),
            names.fill(&format!("GRANT SELECT, UPDATE ON {{feed}} TO {role}")),
            // Reading past versions, purging a user's, pruning old ones.
            names.fill(&format!("GRANT SELECT, DELETE ON {{history}} TO {role}")),
            names.fill(&format!(
                "GRANT USAGE, SELECT, UPDATE ON SEQUENCE {{versions}} TO {role}"
            )),
            names.fill(&format!(
                "GRANT SELECT, UPDATE ON SEQUENCE {{emit}} TO {role}"
            )),
            names.fill(&format!("GRANT EXECUTE ON FUNCTION {{write_fn}} TO {role}")),
            names.fill(&format!(
                "GRANT EXECUTE ON FUNCTION {{delete_fn}} TO {role}"
            )),
            names.fill(&format!(
                "GRANT EXECUTE ON FUNCTION {{write_by_fn}} TO {role}"
            )),
            names.fill(&format!(
                "GRANT EXECUTE ON FUNCTION {{delete_by_fn}} TO {role}"
            )),
            format!(
                "GRANT SELECT ON \"{}\".\"{}\" TO {role}",
                self.schema,
                crate::migrate::bookkeeping_table(&self.table)
            ),
        ];
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| map_error(&self.name, self.statement_timeout, e))?;
        for statement in statements {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
                .map_err(|e| map_error(&self.name, self.statement_timeout, e))?;
        }
        tx.commit()
            .await
            .map_err(|e| map_error(&self.name, self.statement_timeout, e))
    }
}
