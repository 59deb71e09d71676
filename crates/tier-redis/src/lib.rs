//! The Redis tier of tiercache: shared by every service instance, 30-minute TTL by default.
//!
//! * **Connections**: the `redis` crate on tokio through a [`ConnectionManager`] that reconnects
//!   by itself. The first call starts the connection in a task of its own and waits for it at
//!   most one command time limit: a connection that takes longer (TLS, AUTH, a far server, a
//!   cluster's discovery) goes on in the background while calls fail fast with a transient
//!   [`Error::Unavailable`], instead of being cancelled with each caller and started again. A
//!   service starts while Redis is down, and while it is unreachable every call fails fast. `rediss://`
//!   URLs use TLS (the system's OpenSSL); `redis://user:password@host` authenticates (ACL
//!   users too). The password is never printed: `Debug` shows the address and user only.
//! * **Keys**: the prefix (default `tiercache:`) followed by the key, percent-encoded
//!   ([`keys`]): one-to-one, and free of `:` and glob characters. No command is ever built from
//!   a key as a pattern; [`clear`](CacheTier::clear) scans for this tier's prefix only.
//! * **Values**: a versioned [`envelope`] (format, flags, source version, payload in
//!   MessagePack by default or JSON, lz4-compressed above 4 KiB by default), written by Lua
//!   scripts that refuse an older version and honour tombstones ([`scripts`]), with a TTL per
//!   entry (with jitter).
//! * **Reads**: one command, GET (or MGET for batches), as cheap for Redis as a raw GET; the
//!   envelope records the expiry, so an entry comes back with its remaining time to live (the
//!   chain caps back-fills with it). Bytes that do not decode are a miss: the key is deleted
//!   and counted in [`TierStats::corrupt`].
//! * **Redis Cluster** (feature `cluster`): `RedisTierBuilder::cluster(seed nodes)` talks to a
//!   cluster instead of one server. Every script touches one key, so each runs on the key's
//!   master; batch reads (MGET) are split by slot by the tier and reassembled in order;
//!   `clear` scans every master. A [`RedisBackplane`] over [`RedisTier::backplane_clients`]
//!   listens and publishes on one node at a time (a cluster forwards every PUBLISH to all its
//!   nodes) and moves to another when that one fails. Tested against a three-master cluster of
//!   local `redis-server` processes (`tests/cluster.rs`, the same contract as one server), and
//!   through a master's death and its replica's election.
//!
//! ```no_run
//! # async fn demo() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tiercache_core::{CacheTier, Entry};
//! use tiercache_redis::RedisTier;
//!
//! let redis = RedisTier::<String, String>::builder()
//!     .url("redis://127.0.0.1:6379/")
//!     .prefix("myapp:config:")
//!     .ttl(Duration::from_secs(1800))
//!     .build()?; // does not connect yet
//! redis.set(&"alice".into(), Entry::new(Arc::new("dark".into()), 3)).await?;
//! let entry = redis.get(&"alice".into()).await?.expect("stored");
//! assert_eq!(entry.version, 3);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod backplane;
pub mod envelope;
pub mod keys;
pub mod scripts;
#[cfg(feature = "cluster")]
mod slots;

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, RedisError, Value as RedisValue};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{
    CacheTier, Clock, Counter, Entry, Error, Result, StorageKey, TierStats, Timestamp, Version,
};

use crate::envelope::{Codec, Stored};
use crate::scripts::Scripts;

pub use crate::backplane::{BackplaneStats, RedisBackplane};
pub use crate::keys::{decode_key, encode_key};

/// Default server.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "tiercache:";
/// Default time to live of an entry (the seed design's `REDIS_CACHE_TTL`, 30 minutes).
pub const DEFAULT_TTL: Duration = Duration::from_secs(1800);
/// Default jitter: TTLs are shortened by up to 10%, so entries filled together do not expire
/// together.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default time limit of one command's response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default time limit of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default size above which payloads are compressed: a typical `UserConfig` (2 KB) is not, a
/// large one is.
pub const DEFAULT_COMPRESS_ABOVE: Option<usize> = Some(4096);
/// Default tier name.
pub const DEFAULT_NAME: &str = "redis";
/// Keys per `MGET` in `get_many`: a bounded command and reply, however many keys are asked.
const BATCH: usize = 1000;
/// After a connection failure, calls fail at once for this long instead of waiting on a
/// reconnection each.
const FAIL_FAST_FOR: Duration = Duration::from_millis(200);

/// The Redis tier. See the [crate docs](crate).
pub struct RedisTier<K, V> {
    client: Client,
    seeds: Vec<Client>,
    #[cfg(feature = "cluster")]
    cluster: Option<redis::cluster::ClusterClient>,
    link: Arc<Link>,
    scripts: Scripts,
    config: Config,
    clock: Clock,
    stats: Stats,
    _types: PhantomData<fn() -> (K, V)>,
}

#[derive(Clone)]
struct Config {
    name: String,
    prefix: String,
    ttl: Duration,
    tombstone_ttl: Duration,
    jitter: f64,
    timeout: Duration,
    connect_timeout: Duration,
    compress_above: Option<usize>,
    codec: Codec,
}

/// The connection and what the tier knows of it, shared with the task that makes it.
struct Link {
    /// Made once, by a connecting task; it reconnects by itself afterwards.
    conn: OnceLock<Conn>,
    /// A connecting task is running.
    connecting: AtomicBool,
    /// Told when a connecting task ends, made or not.
    done: tokio::sync::Notify,
    connected: AtomicBool,
    /// Nanoseconds since `epoch` until which calls fail fast (0: not failing).
    down_until: AtomicU64,
    epoch: Instant,
}

/// Ends a connecting task's turn: clears the flag and wakes the callers waiting for it.
struct Connected<'a>(&'a Link);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connecting.store(false, Ordering::Release);
        self.0.done.notify_waiters();
    }
}

impl Link {
    fn new() -> Self {
        Link {
            conn: OnceLock::new(),
            connecting: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
            connected: AtomicBool::new(false),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn failing_fast(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now < self.down_until.load(Ordering::Relaxed)
    }

    /// Calls fail at once for [`FAIL_FAST_FOR`] from now.
    fn fail_fast(&self) {
        let until = self.epoch.elapsed() + FAIL_FAST_FOR;
        self.down_until.store(
            u64::try_from(until.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

#[derive(Default)]
struct Stats {
    hits: Counter,
    misses: Counter,
    errors: Counter,
    corrupt: Counter,
    rejected: Counter,
}

/// The connection the tier sends commands on: one server through a reconnecting manager, or a
/// Redis Cluster (feature `cluster`), whose connection routes each command by its key's slot
/// (MGET and UNLINK are split by slot by the tier: `slots`).
#[derive(Clone)]
enum Conn {
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
struct Redacted<'a>(&'a Client);

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

impl<K, V> fmt::Debug for RedisTier<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTier")
            .field("server", &Redacted(&self.client))
            .field("name", &self.config.name)
            .field("prefix", &self.config.prefix)
            .field("ttl", &self.config.ttl)
            .field("timeout", &self.config.timeout)
            .field("connected", &self.link.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Maps a redis error onto the core's: timeouts and connection trouble are transient.
fn map_error(tier: &str, error: RedisError) -> Error {
    if error.is_timeout() {
        Error::Timeout {
            tier: tier.to_owned(),
            after: Duration::ZERO,
        }
    } else if error.is_io_error() || error.is_connection_refusal() || error.is_connection_dropped()
    {
        Error::unavailable(tier, error)
    } else {
        Error::backend(tier, error)
    }
}

/// Whether an error says the connection, not the command, failed.
fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}

/// Why a call could not be made at all.
#[derive(Debug, thiserror::Error)]
#[error("Redis was unreachable moments ago; not retrying yet")]
struct FailingFast;

/// A call made while the first connection is still being made.
#[derive(Debug, thiserror::Error)]
#[error("still connecting to Redis")]
struct Connecting;

/// A value that does not serialize.
#[derive(Debug, thiserror::Error)]
#[error("value does not serialize: {0}")]
struct Unserializable(String);

/// Where and why JSON did not decode, without quoting the data (it may be a user's
/// configuration): "data error at line 1 column 31".
fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "io",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "unexpected end",
    };
    format!("{kind} error at line {} column {}", e.line(), e.column())
}

/// `value` serialized with `codec`.
fn encode_payload<V: Serialize>(value: &V, codec: Codec) -> std::result::Result<Vec<u8>, String> {
    match codec {
        Codec::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
        Codec::Json => serde_json::to_vec(value).map_err(|e| json_error(&e)),
    }
}

/// A payload serialized with `codec`; the error says what failed, never the data.
fn decode_payload<V: DeserializeOwned>(
    payload: &[u8],
    codec: Codec,
) -> std::result::Result<V, String> {
    match codec {
        Codec::MessagePack => rmp_serde::from_slice(payload).map_err(|e| match e {
            rmp_serde::decode::Error::InvalidMarkerRead(_)
            | rmp_serde::decode::Error::InvalidDataRead(_) => "truncated MessagePack".to_owned(),
            rmp_serde::decode::Error::TypeMismatch(_) => "MessagePack type mismatch".to_owned(),
            rmp_serde::decode::Error::OutOfRange => "MessagePack number out of range".to_owned(),
            rmp_serde::decode::Error::LengthMismatch(_) => "MessagePack length mismatch".to_owned(),
            rmp_serde::decode::Error::Utf8Error(_) => "MessagePack string not UTF-8".to_owned(),
            // serde's custom messages may quote the data: say only that the shape is wrong.
            _ => "MessagePack data does not fit the value's type".to_owned(),
        }),
        Codec::Json => serde_json::from_slice(payload).map_err(|e| json_error(&e)),
    }
}

/// A stored payload that does not deserialize.
#[derive(Debug, thiserror::Error)]
#[error("stored value does not decode: {0}")]
struct Undecodable(String);

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> RedisTier<K, V> {
    /// Starts configuring a tier.
    pub fn builder() -> RedisTierBuilder<K, V> {
        RedisTierBuilder::default()
    }

    /// The Redis key of `key`.
    #[must_use]
    pub fn redis_key(&self, key: &K) -> String {
        let mut out = self.config.prefix.clone();
        out.push_str(&encode_key(&key.storage_key()));
        out
    }

    /// The redis client (to open a [`RedisBackplane`] on the same server and settings); for a
    /// cluster, its first seed node.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The clients a [`RedisBackplane`] on this tier's Redis should use
    /// ([`RedisBackplane::with_clients`]): the server, or every seed node of the cluster.
    #[must_use]
    pub fn backplane_clients(&self) -> Vec<Client> {
        self.seeds.clone()
    }

    /// The time limit of one command.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The time limit of one connection attempt.
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        self.config.connect_timeout
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

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
    async fn connection(&self) -> Result<Conn> {
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
    /// calls fail fast for a moment and the next one after that tries again.
    fn connect(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
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
                    link.fail_fast();
                    tracing::debug!(tier = %name, error = %map_error(&name, error), "could not connect to Redis");
                }
                Err(_) => {
                    link.fail_fast();
                    tracing::debug!(tier = %name, after = ?limit * 2, "could not connect to Redis in time");
                }
            }
        }
    }

    /// Runs one command or script, failing fast while Redis is known to be unreachable, and
    /// keeps the connection state and error count.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.link.failing_fast() {
            self.stats.errors.incr();
            return Err(Error::unavailable(&self.config.name, FailingFast));
        }
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
                self.link.down_until.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Err(error) => {
                self.stats.errors.incr();
                if is_connection_error(&error) {
                    self.link.connected.store(false, Ordering::Relaxed);
                    if !error.is_timeout() {
                        self.link.fail_fast();
                    }
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

    fn ttl_for(&self, entry: &Entry<V>, now: Timestamp) -> Duration {
        let ttl = if self.config.jitter > 0.0 {
            self.config
                .ttl
                .mul_f64(1.0 - self.config.jitter * fastrand::f64())
        } else {
            self.config.ttl
        };
        entry.capped_expiry(now, ttl).saturating_since(now)
    }

    /// Turns one stored value (its envelope carries the expiry) into an entry; deletes and
    /// counts undecodable ones.
    async fn decode_one(
        &self,
        redis_key: &str,
        raw: RedisValue,
        now: Timestamp,
        now_unix_ms: u64,
    ) -> Option<Entry<V>> {
        let bytes = match raw {
            RedisValue::BulkString(bytes) => bytes,
            _ => return None,
        };
        // The envelope records the expiry as wall-clock time; the chain wants it on its clock.
        let expires_at = |unix_ms: u64| {
            (unix_ms > 0).then(|| now + Duration::from_millis(unix_ms.saturating_sub(now_unix_ms)))
        };
        let decoded = envelope::decode(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|stored| match stored {
                Stored::Tombstone { .. } => Ok(None),
                Stored::Absent {
                    version,
                    expires_unix_ms,
                } => Ok(Some(Entry {
                    value: None,
                    version,
                    expires_at: expires_at(expires_unix_ms),
                })),
                Stored::Value {
                    version,
                    expires_unix_ms,
                    payload,
                    codec,
                } => decode_payload::<V>(&payload, codec)
                    .map(|v| {
                        Some(Entry {
                            value: Some(Arc::new(v)),
                            version,
                            expires_at: expires_at(expires_unix_ms),
                        })
                    })
                    .map_err(|e| Undecodable(e).to_string()),
            });
        match decoded {
            Ok(entry) => entry,
            Err(reason) => {
                self.stats.corrupt.incr();
                tracing::debug!(tier = %self.config.name, %reason, "undecodable entry deleted");
                let script = &self.scripts.delete_if_same;
                let _ = self
                    .run(|mut con| async move {
                        script
                            .key(redis_key)
                            .arg(bytes)
                            .invoke_async::<i64>(&mut con)
                            .await
                    })
                    .await;
                None
            }
        }
    }

    /// Reads `redis_keys` in one command (`GET`, or `MGET` for several; per slot in a
    /// cluster).
    async fn read(&self, redis_keys: &[String]) -> Result<Vec<Option<Entry<V>>>> {
        // One command: GET, or MGET for several keys. The envelope carries the expiry.
        let values: Vec<RedisValue> = self
            .run(|mut con| async move {
                #[cfg(feature = "cluster")]
                if let (Conn::Cluster(cluster), [_, _, ..]) = (&con, redis_keys) {
                    return slots::mget(cluster, redis_keys).await;
                }
                if let [only] = redis_keys {
                    let value: RedisValue =
                        redis::cmd("GET").arg(only).query_async(&mut con).await?;
                    Ok(vec![value])
                } else {
                    redis::cmd("MGET")
                        .arg(redis_keys)
                        .query_async(&mut con)
                        .await
                }
            })
            .await?;
        if values.len() != redis_keys.len() {
            return Err(Error::backend(
                &self.config.name,
                Undecodable(format!(
                    "Redis answered {} values for {} keys",
                    values.len(),
                    redis_keys.len()
                )),
            ));
        }
        let (now, now_unix_ms) = (self.clock.now(), unix_ms_now());
        let mut out = Vec::with_capacity(redis_keys.len());
        for (key, raw) in redis_keys.iter().zip(values) {
            let entry = self.decode_one(key, raw, now, now_unix_ms).await;
            if entry.is_some() {
                self.stats.hits.incr();
            } else {
                self.stats.misses.incr();
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// Milliseconds since the Unix epoch.
fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[async_trait]
impl<K, V> CacheTier<K, V> for RedisTier<K, V>
where
    K: StorageKey,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let mut found = self.read(&[self.redis_key(key)]).await?;
        Ok(found.pop().flatten())
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let redis_keys: Vec<String> = chunk.iter().map(|k| self.redis_key(k)).collect();
            out.extend(self.read(&redis_keys).await?);
        }
        Ok(out)
    }

    async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool> {
        let now = self.clock.now();
        let ttl = self.ttl_for(&entry, now);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Ok(false);
        }
        let bytes = match &entry.value {
            Some(value) => {
                let payload = encode_payload(&**value, self.config.codec)
                    .map_err(|e| Error::InvalidInput(Unserializable(e).to_string()))?;
                envelope::encode_value(
                    entry.version,
                    unix_ms_now() + ttl_ms,
                    &payload,
                    self.config.codec,
                    self.config.compress_above,
                )
            }
            None => envelope::encode_absent(entry.version, unix_ms_now() + ttl_ms),
        };
        let redis_key = self.redis_key(key);
        let script = &self.scripts.set;
        let stored: i64 = self
            .run(|mut con| async move {
                script
                    .key(redis_key)
                    .arg(bytes)
                    .arg(entry.version)
                    .arg(ttl_ms)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        if stored == 0 {
            self.stats.rejected.incr();
        }
        Ok(stored == 1)
    }

    async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()> {
        let redis_key = self.redis_key(key);
        let version = version.map(|v| v.to_string()).unwrap_or_default();
        let ttl_ms = u64::try_from(self.config.tombstone_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let script = &self.scripts.invalidate;
        let _: i64 = self
            .run(|mut con| async move {
                script
                    .key(redis_key)
                    .arg(version)
                    .arg(ttl_ms)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        Ok(())
    }

    /// One round trip for the lot: every invalidation is sent at once on the multiplexed
    /// connection (the client pipelines them), each still its own atomic script.
    async fn invalidate_many(&self, keys: &[(K, Option<Version>)]) -> Result<()> {
        let ttl_ms = u64::try_from(self.config.tombstone_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let script = &self.scripts.invalidate;
        let calls: Vec<(String, String)> = keys
            .iter()
            .map(|(key, version)| {
                let version = version.map(|v| v.to_string()).unwrap_or_default();
                (self.redis_key(key), version)
            })
            .collect();
        self.run(|con| async move {
            let sent = calls.into_iter().map(|(redis_key, version)| {
                let mut con = con.clone();
                async move {
                    script
                        .key(redis_key)
                        .arg(version)
                        .arg(ttl_ms)
                        .invoke_async::<i64>(&mut con)
                        .await
                }
            });
            futures_util::future::try_join_all(sent).await.map(|_| ())
        })
        .await
    }

    async fn clear(&self) -> Result<()> {
        // A cluster spreads keys over its masters: scan each one.
        #[cfg(feature = "cluster")]
        if self.cluster.is_some() {
            for (host, port) in self.cluster_masters().await? {
                self.clear_node(Some((host, port))).await?;
            }
            return Ok(());
        }
        self.clear_node(None).await
    }

    fn stats(&self) -> TierStats {
        let s = &self.stats;
        TierStats::new(self.config.name.clone(), s.hits.get(), s.misses.get())
            .with_errors(s.errors.get())
            .with_housekeeping(0, s.corrupt.get(), s.rejected.get())
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> RedisTier<K, V> {
    /// Removes this tier's keys from one server (`node`: a cluster master's address).
    async fn clear_node(&self, node: Option<(String, u16)>) -> Result<()> {
        let pattern = format!("{}*", keys::glob_escape(&self.config.prefix));
        let prefix_len = self.config.prefix.len();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500);
            let node = node.clone();
            let (next, found): (u64, Vec<String>) = self
                .run(|con| async move {
                    let value = send_to(con, scan, node).await?;
                    redis::from_redis_value(value).map_err(Into::into)
                })
                .await?;
            // Only keys this tier wrote: the prefix, then an encoded key (which has no ':').
            let ours: Vec<String> = found
                .into_iter()
                .filter(|k| {
                    k.get(prefix_len..)
                        .is_some_and(|rest| decode_key(rest).is_some())
                })
                .collect();
            if !ours.is_empty() {
                let _: i64 = self
                    .run(|mut con| async move {
                        #[cfg(feature = "cluster")]
                        if let Conn::Cluster(cluster) = &con {
                            return slots::unlink(cluster, &ours).await;
                        }
                        redis::cmd("UNLINK").arg(ours).query_async(&mut con).await
                    })
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The cluster's masters, from `CLUSTER SLOTS`.
    #[cfg(feature = "cluster")]
    async fn cluster_masters(&self) -> Result<Vec<(String, u16)>> {
        let slots: Vec<RedisValue> = self
            .run(|mut con| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        let mut masters = Vec::new();
        for range in slots {
            // [start, end, [host, port, id, ...], replicas...]
            let RedisValue::Array(fields) = range else {
                continue;
            };
            let Some(RedisValue::Array(master)) = fields.get(2) else {
                continue;
            };
            let host = match master.first() {
                Some(RedisValue::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(RedisValue::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(RedisValue::Int(port)) = master.get(1) else {
                continue;
            };
            let address = (host, u16::try_from(*port).unwrap_or(0));
            if !masters.contains(&address) {
                masters.push(address);
            }
        }
        Ok(masters)
    }
}

/// Sends `cmd` on `con`, to the cluster node at `node` when one is given.
async fn send_to(
    mut con: Conn,
    cmd: redis::Cmd,
    node: Option<(String, u16)>,
) -> redis::RedisResult<RedisValue> {
    match (&mut con, node) {
        #[cfg(feature = "cluster")]
        (Conn::Cluster(cluster), Some((host, port))) => {
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            cluster
                .route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                )
                .await
        }
        _ => cmd.query_async(&mut con).await,
    }
}

/// Configures a [`RedisTier`]; see [`RedisTier::builder`].
#[must_use]
pub struct RedisTierBuilder<K, V> {
    url: String,
    root_certificate: Option<Vec<u8>>,
    #[cfg(feature = "cluster")]
    cluster_nodes: Vec<String>,
    config: Config,
    tombstone_ttl: Option<Duration>,
    clock: Clock,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Default for RedisTierBuilder<K, V> {
    fn default() -> Self {
        RedisTierBuilder {
            url: DEFAULT_URL.to_owned(),
            root_certificate: None,
            #[cfg(feature = "cluster")]
            cluster_nodes: Vec::new(),
            config: Config {
                name: DEFAULT_NAME.to_owned(),
                prefix: DEFAULT_PREFIX.to_owned(),
                ttl: DEFAULT_TTL,
                tombstone_ttl: DEFAULT_TTL,
                jitter: DEFAULT_JITTER,
                timeout: DEFAULT_TIMEOUT,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                compress_above: DEFAULT_COMPRESS_ABOVE,
                codec: Codec::default(),
            },
            tombstone_ttl: None,
            clock: Clock::system(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for RedisTierBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = Client::open(self.url.as_str())
            .map(|c| format!("{:?}", Redacted(&c)))
            .unwrap_or_else(|_| "<invalid url>".to_owned());
        f.debug_struct("RedisTierBuilder")
            .field("server", &server)
            .field("name", &self.config.name)
            .field("prefix", &self.config.prefix)
            .field("ttl", &self.config.ttl)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static>
    RedisTierBuilder<K, V>
{
    /// The server: `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
    /// Defaults to [`DEFAULT_URL`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Talks to a Redis Cluster through these seed nodes (`redis://host:port/` each; the
    /// cluster's other nodes are discovered) instead of the single server of
    /// [`url`](Self::url). Keys are routed by slot; batch reads are split by node.
    #[cfg(feature = "cluster")]
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// For `rediss://`: trust only this CA certificate (PEM) instead of the system's trust
    /// store (a private CA). Hostnames are still verified.
    pub fn root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// The prefix of every key this tier writes; several caches may share one Redis with
    /// different prefixes. Defaults to [`DEFAULT_PREFIX`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Time to live of a stored entry (capped by the entry's own remaining time). Defaults to
    /// [`DEFAULT_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long an invalidation's tombstone refuses older versions. Defaults to the TTL.
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = Some(ttl);
        self
    }

    /// Shortens each entry's TTL by a random fraction up to `jitter` (in `[0, 1)`). Defaults to
    /// [`DEFAULT_JITTER`].
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// Time limit of one command's response. Defaults to [`DEFAULT_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Time limit of one connection attempt. Defaults to [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Payloads longer than this many bytes are stored lz4-compressed (`None`: never).
    /// Defaults to [`DEFAULT_COMPRESS_ABOVE`].
    pub fn compress_above(mut self, bytes: Option<usize>) -> Self {
        self.config.compress_above = bytes;
        self
    }

    /// How values are serialized. Defaults to [`Codec::MessagePack`], which benches/tiers.rs
    /// measured smaller and faster than JSON for a `UserConfig`. Reading decodes either.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.config.codec = codec;
        self
    }

    /// The tier's name in stats and errors. Defaults to [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// The clock that turns a remaining TTL into an expiry. Defaults to [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the tier. Nothing connects until the first call (which starts the connection in
    /// a task of its own).
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that does not parse (the message never repeats the URL), a
    /// zero TTL or time limit, a jitter outside `[0, 1)`, or an empty prefix.
    pub fn build(self) -> Result<RedisTier<K, V>> {
        let bad_url = |e: RedisError| {
            Error::Config(format!(
                "the Redis URL does not parse ({:?}); expected redis://[user[:password]@]host[:port][/db] or rediss://...",
                e.kind()
            ))
        };
        let client = match self.root_certificate {
            #[cfg(any(feature = "native-tls", feature = "rustls"))]
            Some(pem) => Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(bad_url)?,
            #[cfg(not(any(feature = "native-tls", feature = "rustls")))]
            Some(_) => {
                return Err(Error::Config(
                    "a root certificate needs TLS: feature `native-tls` or `rustls`".into(),
                ));
            }
            None => Client::open(self.url.as_str()).map_err(bad_url)?,
        };
        #[cfg(feature = "cluster")]
        let (client, cluster, seeds) = if self.cluster_nodes.is_empty() {
            (client.clone(), None, vec![client])
        } else {
            let cluster =
                redis::cluster::ClusterClient::new(self.cluster_nodes.clone()).map_err(bad_url)?;
            // A client per seed node, for a backplane (any node will do for pub/sub).
            let seeds = self
                .cluster_nodes
                .iter()
                .map(|node| Client::open(node.as_str()).map_err(bad_url))
                .collect::<Result<Vec<_>>>()?;
            (seeds[0].clone(), Some(cluster), seeds)
        };
        #[cfg(not(feature = "cluster"))]
        let seeds = vec![client.clone()];
        let c = &self.config;
        if c.ttl.is_zero() || c.timeout.is_zero() || c.connect_timeout.is_zero() {
            return Err(Error::Config(
                "Redis ttl, timeout and connect_timeout must be positive".into(),
            ));
        }
        if self.tombstone_ttl.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config("Redis tombstone_ttl must be positive".into()));
        }
        if !(0.0..1.0).contains(&c.jitter) {
            return Err(Error::Config(format!(
                "Redis jitter must be in [0, 1), got {}",
                c.jitter
            )));
        }
        if c.prefix.is_empty() {
            return Err(Error::Config(
                "the Redis key prefix must not be empty (clear() removes only prefixed keys)"
                    .into(),
            ));
        }
        let mut config = self.config;
        config.tombstone_ttl = self.tombstone_ttl.unwrap_or(config.ttl);
        Ok(RedisTier {
            client,
            seeds,
            #[cfg(feature = "cluster")]
            cluster,
            link: Arc::new(Link::new()),
            scripts: Scripts::new(),
            config,
            clock: self.clock,
            stats: Stats::default(),
            _types: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let url = "redis://app:s3cret-sentinel@cache.internal:6380/2";
        let builder = RedisTier::<String, String>::builder().url(url);
        let printed = format!("{builder:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        let tier = builder.build().unwrap();
        let printed = format!("{tier:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        assert!(printed.contains("app@cache.internal:6380/2"), "{printed}");
        assert!(printed.contains("password set"), "{printed}");
    }

    #[test]
    fn bad_configuration_is_rejected_without_echoing_the_url() {
        let b = || RedisTier::<String, String>::builder();
        let err = b().url("http://s3cret-sentinel@x").build().unwrap_err();
        assert!(!err.to_string().contains("s3cret-sentinel"), "{err}");
        assert!(b().ttl(Duration::ZERO).build().is_err());
        assert!(b().jitter(1.0).build().is_err());
        assert!(b().prefix("").build().is_err());
        assert!(b().tombstone_ttl(Duration::ZERO).build().is_err());
        assert!(b().url("rediss://localhost:6380/").build().is_ok());
    }

    #[test]
    fn redis_keys_are_prefixed_and_encoded() {
        let tier = RedisTier::<String, String>::builder()
            .prefix("app:")
            .build()
            .unwrap();
        assert_eq!(tier.redis_key(&"a:b".to_string()), "app:a%3Ab");
    }
}
