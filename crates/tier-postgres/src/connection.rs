//! Getting a statement to the server: the pool (no ping before each call), a read retried on a
//! connection found dead, a write on a connection that answers a ping, and the probe that tells
//! a busy pool from a server that is down. (A server that is down is not asked again by every
//! call: the chain's circuit breaker skips it after three failures and lets one call probe it
//! per cool-down.)

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tiercache_core::{Error, Result, StorageKey};
use tiercache_sql::error_chain;

use crate::PostgresSource;
use crate::error::{NoConnection, broken_connection, map_error};

/// After a probe found the server answering, pool time-outs are taken for a busy pool without
/// another probe for this long.
pub(crate) const PROBE_QUIET_FOR: Duration = Duration::from_millis(250);

/// Clears the probing flag when the probe ends, finished or dropped with its caller.
struct Probing<'a>(&'a AtomicBool);

impl Drop for Probing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Connection settings without the password.
pub(crate) struct Redacted<'a>(pub(crate) &'a PgConnectOptions);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "postgres://{}@{}:{}/{} (sslmode {:?})",
            o.get_username(),
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or(""),
            o.get_ssl_mode()
        )
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> PostgresSource<K, V> {
    pub(crate) fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs `call` (after the migrations). A read (`retry_broken`) that fails on a pooled
    /// connection that turned out dead (the server restarted, or dropped it while idle) is run
    /// again on another, up to once per pooled connection: the pool does not test connections
    /// before handing them out (that costs a round trip per call), so a read finds a dead one
    /// this way instead.
    pub(crate) async fn run<T, F, Fut>(&self, retry_broken: bool, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    {
        let result = match self.migrations.start().await.map(|_| ()) {
            Ok(()) => {
                let mut result = call().await;
                let mut retries = if retry_broken {
                    self.max_connections
                } else {
                    0
                };
                while retries > 0 && result.as_ref().is_err_and(broken_connection) {
                    tracing::debug!(tier = %self.name, "pooled connection dead; read retried");
                    retries -= 1;
                    result = call().await;
                }
                result.map_err(|e| self.explain(e))
            }
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(value) => Ok(value),
            Err(e) => Err(self.explain_core(e).await),
        };
        if let Err(error) = &result {
            self.stats.errors.incr();
            tracing::debug!(tier = %self.name, %error, "database call failed");
        }
        result
    }

    /// A pooled connection that answers a ping: for writes, which are not retried (a write
    /// that failed on a dead connection may or may not have been applied). Dead ones are taken
    /// out of the pool, up to once per pooled connection.
    pub(crate) async fn live_connection(
        &self,
    ) -> std::result::Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        let mut left = self.max_connections;
        loop {
            let mut conn = self.pool.acquire().await?;
            match conn.ping().await {
                Ok(()) => return Ok(conn),
                Err(e) if left > 0 && broken_connection(&e) => {
                    left -= 1;
                    drop(conn.detach());
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn explain(&self, error: sqlx::Error) -> Error {
        map_error(&self.name, self.statement_timeout, error)
    }

    /// A pool time-out says little: a direct connection attempt (a probe) tells "the server
    /// refuses connections" from "the pool is busy". One probe at a time: the callers that
    /// time out meanwhile, and those in the window after a probe found the server answering,
    /// are told the pool is busy without opening a connection each (a busy pool's waiters would
    /// otherwise exhaust the server's connections).
    pub(crate) async fn explain_core(&self, error: Error) -> Error {
        let Error::Unavailable { source, .. } = &error else {
            return error;
        };
        let pool_busy = source
            .downcast_ref::<NoConnection>()
            .is_some_and(|n| matches!(n, NoConnection::PoolBusy));
        let reason = if pool_busy {
            if self.now_nanos() < self.busy_until.load(Ordering::Relaxed)
                || self.probing.swap(true, Ordering::AcqRel)
            {
                return error;
            }
            let _probing = Probing(&self.probing);
            self.probes.incr();
            let probe = self.options.connect();
            match tokio::time::timeout(self.connect_timeout, probe).await {
                Ok(Ok(conn)) => {
                    // The server answers: the pool is busy, not the server down.
                    let until =
                        self.now_nanos() + u64::try_from(PROBE_QUIET_FOR.as_nanos()).unwrap_or(0);
                    self.busy_until.store(until, Ordering::Relaxed);
                    let _ = tokio::time::timeout(self.connect_timeout, conn.close()).await;
                    return error;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer to a connection attempt".to_owned(),
            }
        } else {
            error_chain(&error)
        };
        Error::unavailable(&self.name, NoConnection::Unreachable(reason))
    }

    /// Probe connections opened so far to tell a busy pool from a server that is down.
    #[must_use]
    pub fn probes(&self) -> u64 {
        self.probes.get()
    }
}
