//! [`Database`]: which authoritative database a storage reads and writes, and what only the
//! database can do (migrations, grants, how long a write may still land).

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::Source;
#[cfg(feature = "postgres")]
use tiercache_postgres::PostgresSource;
#[cfg(feature = "sqlite")]
use tiercache_sqlite::SqliteSource;

use crate::Key;
use crate::config::UserConfig;
use crate::error::{Error, Result};

/// Which authoritative database the storage reads and writes.
#[derive(Clone)]
pub(crate) enum Database {
    #[cfg(feature = "postgres")]
    Postgres(Arc<PostgresSource<Key, UserConfig>>),
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<SqliteSource<Key, UserConfig>>),
    Custom(Arc<dyn Source<Key, UserConfig>>),
}

impl Database {
    pub(crate) fn source(&self) -> Arc<dyn Source<Key, UserConfig>> {
        match self {
            #[cfg(feature = "postgres")]
            Database::Postgres(t) => t.clone(),
            #[cfg(feature = "sqlite")]
            Database::Sqlite(t) => t.clone(),
            Database::Custom(t) => t.clone(),
        }
    }

    /// How long after the chain gave up on a write it may still commit, and a margin.
    pub(crate) fn write_settle(&self) -> Duration {
        let inside = match self {
            #[cfg(feature = "postgres")]
            Database::Postgres(t) => t.longest_write(),
            #[cfg(feature = "sqlite")]
            Database::Sqlite(t) => t.longest_write(),
            Database::Custom(_) => return tiercache_core::DEFAULT_WRITE_SETTLE,
        };
        inside + Duration::from_secs(1)
    }

    /// Runs the database's migrations now.
    pub(crate) async fn migrate(&self) -> Result<()> {
        match self {
            #[cfg(feature = "postgres")]
            Database::Postgres(t) => Ok(t.migrate().await?),
            // Migrated when it was opened.
            #[cfg(feature = "sqlite")]
            Database::Sqlite(_) => Ok(()),
            Database::Custom(_) => Err(Error::Settings(
                "a custom source runs its own migrations, if it has any".into(),
            )),
        }
    }

    /// Grants `role` what a service needs on the database's objects (PostgreSQL only).
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(crate) async fn grant_to(&self, role: &str) -> Result<()> {
        match self {
            #[cfg(feature = "postgres")]
            Database::Postgres(t) => Ok(t.grant_to(role).await?),
            _ => Err(Error::Settings(format!(
                "roles are a PostgreSQL matter; the {} database has none",
                self.backend()
            ))),
        }
    }

    pub(crate) fn backend(&self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Database::Postgres(_) => "postgres",
            #[cfg(feature = "sqlite")]
            Database::Sqlite(_) => "sqlite",
            Database::Custom(_) => "custom",
        }
    }
}
