//! The connection's lifecycle: made once by a task of its own (whoever gives up waiting), then
//! reconnecting by itself; the address shown without its password. (A Redis that is down is
//! not asked again by every call: the chain's circuit breaker skips it after three failures and
//! lets one call probe it per cool-down.)

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, Value as RedisValue};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{Error, Result, StorageKey};

use crate::error::{Connecting, is_connection_error, map_error};
use crate::tier::RedisTier;

/// The connection and what the tier knows of it, shared with the task that makes it.
pub(crate) struct Link {
    /// Made once, by a connecting task; it reconnects by itself afterwards.
    pub(crate) conn: OnceLock<Conn>,
    /// A connecting task is running.
    pub(crate) connecting: AtomicBool,
    /// Told when a connecting task ends, made or not.
    pub(crate) done: tokio::sync::Notify,
    pub(crate) connected: AtomicBool,
}

/// Ends a connecting task's turn: clears the flag and wakes the callers waiting for it.
pub(crate) struct Connected<'a>(pub(crate) &'a Link);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connecting.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

impl Link {
    pub(crate) fn new() -> Self {
        Link {
            conn: OnceLock::new(),
            connecting: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            connected: AtomicBool::new(false),
        }
    }
}

/// The connection the tier sends commands on: one server through a reconnecting manager, or a
/// Redis Cluster (feature `cluster`), whose connection routes each command by its key's slot
/// (MGET and UNLINK are split by slot by the tier: `slots`).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, RedisValue> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<RedisValue>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The address part of a connection, for `Debug` and logs: never the password.
pub(crate) struct Redacted<'a>(pub(crate) &'a Client);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.0.get_connection_info();
        let (scheme, address) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => ("redis", format!("{host}:{port}")),
            ConnectionAddr::TcpTls { host, port, .. } => ("rediss", format!("{host}:{port}")),
            ConnectionAddr::Unix(path) => ("unix", path.display().to_string()),
            _ => ("redis", "?".to_owned()),
        };
        let settings = info.redis_settings();
        let user = settings
            .username()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let password = if settings.password().is_some() {
            " (password set)"
        } else {
            ""
        };
        write!(f, "{scheme}://{user}{address}/{}{password}", settings.db())
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> RedisTier<K, V> {
    /// Whether the last command reached Redis.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.link.connected.load(Ordering::Relaxed)
    }

    /// Sends a PING.
    pub async fn ping(&self) -> Result<()> {
        let pong: String = self
            .run(|mut con| async move { redis::cmd("PING").query_async(&mut con).await })
            .await?;
        debug_assert_eq!(pong, "PONG");
        Ok(())
    }

    /// Starts connecting now, in a task of its own, and waits for it for at most `within`
    /// (a service calls this at start-up, so that its first requests find the connection
    /// made). Returns whether it is made.
    pub async fn connect_within(&self, within: Duration) -> bool {
        if self.link.conn.get().is_some() {
            return true;
        }
        let done = self.link.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if !self.link.connecting.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(self.connect())),
                // No runtime to connect on: the next call (in one) tries.
                Err(_) => self.link.connecting.store(false, Ordering::Release),
            }
        }
        if self.link.conn.get().is_none() {
            let _ = tokio::time::timeout(within, done).await;
        }
        self.link.conn.get().is_some()
    }

    /// The connection. The first call starts a task that makes it (it needs a running tokio
    /// runtime) and waits for that task at most one command time limit: a connection that
    /// needs longer is finished by the task, whoever gives up waiting, while calls fail with
    /// [`Connecting`]. One server gets a reconnecting manager; a cluster, a cluster connection
    /// (which must reach a node to learn the slots).
    pub(crate) async fn connection(&self) -> Result<Conn> {
        if let Some(conn) = self.link.conn.get() {
            return Ok(conn.clone());
        }
        self.connect_within(self.config.timeout).await;
        self.link
            .conn
            .get()
            .cloned()
            .ok_or_else(|| Error::unavailable(&self.config.name, Connecting))
    }

    /// The task that makes the connection: on success every later call uses it; on failure
    /// the next call tries again.
    pub(crate) fn connect(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let link = Arc::clone(&self.link);
        let (name, limit) = (self.config.name.clone(), self.config.connect_timeout);
        let client = self.client.clone();
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.config.timeout))
            .set_connection_timeout(Some(limit))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        #[cfg(feature = "cluster")]
        let cluster = self.cluster.clone().map(|cluster| {
            let config = redis::cluster::ClusterConfig::new()
                .set_response_timeout(self.config.timeout)
                .set_connection_timeout(limit);
            (cluster, config)
        });
        async move {
            // However this task ends (its runtime shut down mid-attempt, say), the next call
            // may start another.
            let _done = Connected(&link);
            let connecting = async {
                #[cfg(feature = "cluster")]
                if let Some((cluster, config)) = cluster {
                    return cluster
                        .get_async_connection_with_config(config)
                        .await
                        .map(Conn::Cluster);
                }
                ConnectionManager::new_with_config(client, manager)
                    .await
                    .map(Conn::Single)
            };
            // Two attempts' worth: the manager retries once.
            match tokio::time::timeout(limit * 2, connecting).await {
                Ok(Ok(conn)) => {
                    let _ = link.conn.set(conn);
                    link.connected.store(true, Ordering::Relaxed);
                    tracing::debug!(tier = %name, "connected to Redis");
                }
                Ok(Err(error)) => {
                    tracing::debug!(tier = %name, error = %map_error(&name, error), "could not connect to Redis");
                }
                Err(_) => {
                    tracing::debug!(tier = %name, after = ?limit * 2, "could not connect to Redis in time");
                }
            }
        }
    }

    /// Runs one command or script, and keeps the connection state and error count.
    pub(crate) async fn run<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(error) => {
                self.stats.errors.incr();
                return Err(error);
            }
        };
        match call(connection).await {
            Ok(value) => {
                self.link.connected.store(true, Ordering::Relaxed);
                Ok(value)
            }
            Err(error) => {
                self.stats.errors.incr();
                if is_connection_error(&error) {
                    self.link.connected.store(false, Ordering::Relaxed);
                }
                let mapped = match map_error(&self.config.name, error) {
                    Error::Timeout { tier, .. } => Error::Timeout {
                        tier,
                        after: self.config.timeout,
                    },
                    other => other,
                };
                tracing::debug!(tier = %self.config.name, error = %mapped, "redis call failed");
                Err(mapped)
            }
        }
    }
}
