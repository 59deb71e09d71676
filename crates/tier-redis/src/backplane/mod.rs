//! [`RedisBackplane`]: cross-instance invalidation over Redis pub/sub (the seed's "distributed
//! memory cache").
//!
//! * After an update, the chain publishes `key`, the new version and the new value (as JSON,
//!   when it serializes to at most 16 KiB: [`RedisBackplane::set_carry_values_up_to`]); after a
//!   manual invalidation, `key` alone. Fills are never published.
//! * Each instance subscribes to the channel and applies the others' messages to its local tiers
//!   ([`TieredCache::apply`], for their local tiers): a copy it holds is replaced by the new
//!   version when the value came along (no Redis round trip on the next read), else copies
//!   older than the version are dropped and refused afterwards. A late message never evicts
//!   or replaces a newer entry. Its own messages are ignored (each carries the sender's random
//!   instance id).
//! * **Missed messages**: while the subscription is down, messages are lost. When it comes up
//!   (the first time too: reads may have filled the memory tier before the subscription existed),
//!   or after a health check found it dead (a PING every second that must answer within the
//!   command time limit), the instance flushes its local tiers ([`TieredCache::flush_local`])
//!   before applying anything else: whatever it held might have been invalidated meanwhile.
//!   Reconnections wait a jittered backoff of at most a quarter second, so that instances do
//!   not reconnect in step after a restart, and a recovered Redis is noticed quickly.
//! * **Publishing never waits for Redis**: [`publish`](Backplane::publish) queues the message
//!   and a task of the backplane's own sends the queue, in order, one pipeline at a time, each
//!   bounded by the command time limit. What fails is kept (the latest version per key, up to
//!   10,000 keys) and retried every 100 ms; if more keys pile up than that, the next
//!   successful send is a "flush everything" message. [`flush`](Backplane::flush) waits for
//!   the queue to empty (before a process exits).
//! * **Several servers** ([`RedisBackplane::with_clients`], a Redis Cluster's nodes): the
//!   subscription and the publisher each use one, and move to the next when theirs fails.
//!
//! The files: `wire.rs` the message format, `outbox.rs` the queue and the task that publishes
//! it, `listener.rs` the subscription, its health check and how messages are applied; this
//! file the backplane, its settings and statistics.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{Backplane, Counter, Error, Result, StorageKey, TieredCache, Value, Version};

use tokio::task::JoinHandle;

use crate::link::Redacted;
use crate::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_URL};

mod listener;
mod outbox;
mod wire;

use self::listener::listen;
use self::outbox::{Outbox, send_queued};
use self::wire::{Notice, encode_message};

/// Default channel.
pub const DEFAULT_CHANNEL: &str = "tiercache:invalidations";
/// How often the subscription is checked with a PING.
pub const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often failed publishes are retried.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// Failed publishes kept for retry before falling back to "flush everything".
const MAX_PENDING: usize = 10_000;
/// Messages per pipeline.
const SEND_BATCH: usize = 256;
/// First and longest wait before resubscribing (with up to half off at random).
const RESUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(25), Duration::from_millis(250));
/// How often a listener whose subscription is quiet checks that its chain is still alive.
const ALIVE_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Default largest value carried in an update message.
pub const DEFAULT_CARRY_VALUES_UP_TO: usize = 16 * 1024;

struct Inner {
    /// The servers, in order of preference: one, or a cluster's nodes (a cluster forwards every
    /// PUBLISH to all its nodes, so any one of them will do). A connection that fails moves on
    /// to the next.
    clients: Vec<Client>,
    /// Which of `clients` the subscriber uses (modulo their number).
    subscribe_to: AtomicUsize,
    /// Which of `clients` the publisher uses, and its connection once made.
    publisher: Mutex<(usize, Option<ConnectionManager>)>,
    channel: String,
    instance: u64,
    timeout: Duration,
    connect_timeout: Duration,
    carry_values_up_to: AtomicUsize,
    /// Messages waiting to be sent.
    outbox: Mutex<Outbox>,
    /// Told when a message is queued (shared, so that the sender waits without holding the
    /// backplane).
    queued: Arc<tokio::sync::Notify>,
    /// Told when the outbox is empty and nothing is being sent.
    drained: tokio::sync::Notify,
    subscribed: AtomicBool,
    /// The first subscription attempt is over (made, or failed).
    tried: AtomicBool,
    /// Told when it is.
    tried_once: tokio::sync::Notify,
    task: Mutex<Option<JoinHandle<()>>>,
    sender: Mutex<Option<JoinHandle<()>>>,
    published: Counter,
    received: Counter,
    publish_errors: Counter,
    gaps: Counter,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in [&self.task, &self.sender] {
            if let Some(task) = task.lock().unwrap_or_else(PoisonError::into_inner).take() {
                task.abort();
            }
        }
    }
}

/// Cross-instance invalidation over Redis pub/sub. Cheap to clone; clones share the
/// connections. See the [module docs](self).
///
/// ```no_run
/// # async fn demo(
/// #     source: impl tiercache_core::Source<String, String> + 'static,
/// # ) -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::TieredCache;
/// use tiercache_memory::MemoryTier;
/// use tiercache_redis::{RedisBackplane, RedisTier};
///
/// let backplane = RedisBackplane::new("redis://127.0.0.1:6379/", "myapp:invalidations")?;
/// let cache = TieredCache::builder()
///     .tier(MemoryTier::<String, String>::new())
///     .tier(RedisTier::builder().build()?)
///     .source(source)
///     .backplane(Arc::new(backplane.clone()))
///     .build()?;
/// backplane.attach(&cache); // starts listening to the other instances
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBackplane {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("server", &Redacted(&self.inner.clients[0]))
            .field("servers", &self.inner.clients.len())
            .field("channel", &self.inner.channel)
            .field("instance", &format_args!("{:x}", self.inner.instance))
            .field("subscribed", &self.is_subscribed())
            .finish_non_exhaustive()
    }
}

/// Counts of a backplane's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct BackplaneStats {
    /// Messages sent.
    pub published: u64,
    /// Messages from other instances applied.
    pub received: u64,
    /// Publishes that failed (and were kept for retry).
    pub publish_errors: u64,
    /// Times the subscription was found lost and the local tiers flushed.
    pub gaps: u64,
    /// Whether the subscription is up now.
    pub subscribed: bool,
    /// Messages queued or waiting for a retry now.
    #[serde(default)]
    pub queued: u64,
}

impl RedisBackplane {
    /// A backplane on the Redis at `url` (same forms as
    /// [`RedisTierBuilder::url`](crate::RedisTierBuilder::url)), publishing and listening on
    /// `channel`. Nothing connects until the first publish or [`attach`](Self::attach).
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that does not parse or an empty channel.
    pub fn new(url: &str, channel: impl Into<String>) -> Result<Self> {
        Self::with_client(
            Client::open(url).map_err(|e| {
                Error::Config(format!("the Redis URL does not parse ({:?})", e.kind()))
            })?,
            channel,
        )
    }

    /// A backplane over an already configured client (TLS certificates, for instance).
    ///
    /// # Errors
    /// [`Error::Config`] for an empty channel.
    pub fn with_client(client: Client, channel: impl Into<String>) -> Result<Self> {
        Self::with_clients(vec![client], channel)
    }

    /// A backplane over any of several servers: a Redis Cluster's nodes (a cluster forwards
    /// every PUBLISH to all of its nodes). The subscription and the publisher each use one
    /// node at a time, the first to begin with, and move on to the next when theirs fails, so
    /// that a node that dies for good (or a master replaced after a failover) does not cut the
    /// instance off. Moving to another node is a gap like any other: the local tiers are flushed.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty channel or no client.
    pub fn with_clients(clients: Vec<Client>, channel: impl Into<String>) -> Result<Self> {
        let channel = channel.into();
        if channel.is_empty() {
            return Err(Error::Config(
                "the backplane channel must not be empty".into(),
            ));
        }
        if clients.is_empty() {
            return Err(Error::Config("the backplane needs a Redis server".into()));
        }
        Ok(RedisBackplane {
            inner: Arc::new(Inner {
                clients,
                subscribe_to: AtomicUsize::new(0),
                publisher: Mutex::new((0, None)),
                channel,
                instance: fastrand::u64(..),
                timeout: DEFAULT_TIMEOUT,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                carry_values_up_to: AtomicUsize::new(DEFAULT_CARRY_VALUES_UP_TO),
                outbox: Mutex::new(Outbox::default()),
                queued: Arc::new(tokio::sync::Notify::new()),
                drained: tokio::sync::Notify::new(),
                subscribed: AtomicBool::new(false),
                tried: AtomicBool::new(false),
                tried_once: tokio::sync::Notify::new(),
                task: Mutex::new(None),
                sender: Mutex::new(None),
                published: Counter::default(),
                received: Counter::default(),
                publish_errors: Counter::default(),
                gaps: Counter::default(),
            }),
        })
    }

    /// A backplane on the local default server and channel.
    ///
    /// # Errors
    /// Never, in practice (the defaults are valid).
    pub fn local() -> Result<Self> {
        Self::new(DEFAULT_URL, DEFAULT_CHANNEL)
    }

    /// Update messages carry the new value when it serializes to at most `bytes` (0: never),
    /// so that instances holding the key replace it without a Redis round trip. Defaults to
    /// [`DEFAULT_CARRY_VALUES_UP_TO`]. Applies to every clone of this backplane.
    pub fn set_carry_values_up_to(&self, bytes: usize) {
        self.inner
            .carry_values_up_to
            .store(bytes, Ordering::Relaxed);
    }

    /// Whether the subscription is up.
    #[must_use]
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Relaxed)
    }

    /// Counts of the traffic so far.
    #[must_use]
    pub fn stats(&self) -> BackplaneStats {
        let i = &self.inner;
        BackplaneStats {
            published: i.published.get(),
            received: i.received.get(),
            publish_errors: i.publish_errors.get(),
            gaps: i.gaps.get(),
            subscribed: self.is_subscribed(),
            queued: self.outbox().len() as u64,
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.inner
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts applying the other instances' messages to `chain` (in a task on the current
    /// tokio runtime). The task ends when the chain is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn attach<K, V>(&self, chain: &TieredCache<K, V>)
    where
        K: StorageKey,
        V: Value + DeserializeOwned,
    {
        let task = tokio::spawn(listen(Arc::downgrade(&self.inner), chain.downgrade()));
        if let Some(old) = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(task)
        {
            old.abort();
        }
    }

    /// Waits, for at most `within`, until the first subscription attempt is over: subscribed
    /// (and the local tiers flushed), or failed. A service that waits for this before it serves
    /// fills nothing that the first subscription's flush would throw away. Returns whether
    /// the subscription is up.
    pub async fn first_attempt(&self, within: Duration) -> bool {
        let tried = self.inner.tried_once.notified();
        tokio::pin!(tried);
        tried.as_mut().enable();
        if !self.inner.tried.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(within, tried).await;
        }
        self.is_subscribed()
    }

    /// The publisher's connection (made on first use) and which server it is on.
    fn publisher(&self) -> Result<(usize, ConnectionManager)> {
        let mut publisher = self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let server = publisher.0;
        if let Some(m) = &publisher.1 {
            return Ok((server, m.clone()));
        }
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.inner.timeout))
            .set_connection_timeout(Some(self.inner.connect_timeout))
            .set_number_of_retries(1);
        let client = self.inner.clients[server % self.inner.clients.len()].clone();
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::unavailable("backplane", e))?;
        publisher.1 = Some(manager.clone());
        Ok((server, manager))
    }

    /// Sends `batch` in one pipeline, within the command time limit. On failure the next
    /// attempt goes to the next server, if there is one.
    async fn send(&self, batch: &[Notice]) -> Result<()> {
        let (server, mut con) = self.publisher()?;
        let mut pipe = redis::pipe();
        for notice in batch {
            pipe.cmd("PUBLISH")
                .arg(&self.inner.channel)
                .arg(encode_message(self.inner.instance, notice))
                .ignore();
        }
        let sent = tokio::time::timeout(self.inner.timeout, pipe.query_async::<()>(&mut con))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "PUBLISH did not answer in time",
                )))
            });
        if let Err(e) = sent {
            if self.inner.clients.len() > 1 {
                let mut publisher = self
                    .inner
                    .publisher
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if publisher.0 == server {
                    *publisher = (server + 1, None);
                }
            }
            return Err(Error::unavailable("backplane", e));
        }
        for _ in batch {
            self.inner.published.incr();
        }
        Ok(())
    }

    /// Queues a message and makes sure the sender runs.
    fn enqueue(&self, notice: Notice) {
        {
            let mut outbox = self.outbox();
            if outbox.len() >= MAX_PENDING {
                outbox.overflow();
            } else {
                outbox.fresh.push_back(notice);
            }
        }
        let mut sender = self
            .inner
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sender.as_ref().is_none_or(JoinHandle::is_finished) {
            *sender = Some(tokio::spawn(send_queued(Arc::downgrade(&self.inner))));
        }
        drop(sender);
        self.inner.queued.notify_one();
    }
}

#[async_trait]
impl<K: StorageKey, V: Serialize + Send + Sync + 'static> Backplane<K, V> for RedisBackplane {
    /// Queues the message; a task of the backplane's own sends it (see the module docs).
    async fn publish(
        &self,
        key: &K,
        version: Option<Version>,
        value: Option<Arc<V>>,
    ) -> Result<()> {
        let text = key.storage_key().into_owned();
        let limit = self.inner.carry_values_up_to.load(Ordering::Relaxed);
        let json = value
            .filter(|_| limit > 0)
            .and_then(|v| serde_json::to_string(&*v).ok())
            .filter(|json| json.len() <= limit);
        self.enqueue(Notice::Key(text, version, json));
        Ok(())
    }

    async fn flush(&self, within: Duration) -> Result<()> {
        self.flush_queue(within).await
    }
}

impl RedisBackplane {
    /// Waits, for at most `within`, until every queued message is sent (before a process
    /// exits). The chain's [`TieredCache::flush`] calls it.
    ///
    /// # Errors
    /// [`Error::Unfinished`] with how many messages are left.
    pub async fn flush_queue(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let drained = self.inner.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let left = self.outbox().len();
            if left == 0 {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                let left = self.outbox().len();
                return if left == 0 {
                    Ok(())
                } else {
                    Err(Error::Unfinished {
                        tier: "backplane".into(),
                        what: "messages",
                        pending: left as u64,
                    })
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_value_rides_along_up_to_16_kib_of_json_and_not_a_byte_more() {
        // Nothing is sent: the sender task never runs before the queue is read (one thread, no
        // await in between), and the address is unreachable anyway.
        let backplane = RedisBackplane::new("redis://127.0.0.1:1/", "limit").unwrap();
        let publish = async |k: &str, v: String| {
            let key = k.to_string();
            Backplane::<String, String>::publish(&backplane, &key, Some(1), Some(Arc::new(v))).await
        };
        // As JSON a string gains its two quotes.
        let fits = "x".repeat(DEFAULT_CARRY_VALUES_UP_TO - 2);
        let too_big = "x".repeat(DEFAULT_CARRY_VALUES_UP_TO - 1);
        publish("fits", fits.clone()).await.unwrap();
        publish("too-big", too_big).await.unwrap();
        backplane.set_carry_values_up_to(0);
        publish("off", "v".into()).await.unwrap();
        let outbox = backplane.outbox();
        let carried: Vec<_> = outbox
            .fresh
            .iter()
            .map(|n| match n {
                Notice::Key(k, _, value) => (k.as_str(), value.as_ref().map(String::len)),
                Notice::Flush => ("flush", None),
            })
            .collect();
        assert_eq!(
            carried,
            [
                ("fits", Some(DEFAULT_CARRY_VALUES_UP_TO)),
                ("too-big", None),
                ("off", None)
            ]
        );
    }
}
