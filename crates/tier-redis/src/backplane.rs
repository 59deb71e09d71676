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
//! Wire format (UTF-8): `tc1 <instance id, hex> <version | - | *> <percent-encoded key>
//! [<value as JSON>]`, where `-` is a manual invalidation and `*` (with an empty key) asks every
//! instance to flush.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{
    Backplane, Change, Changes, Counter, Error, Result, StorageKey, TieredCache, Value, Version,
    WeakTieredCache,
};

use tokio::task::JoinHandle;

use crate::keys::{decode_key, encode_key};
use crate::link::Redacted;
use crate::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_URL};

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

/// What a message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Notice {
    /// Drop copies of the key older than the version (`None`: whatever is held), or replace a
    /// held copy with the value (JSON) at that version.
    Key(String, Option<Version>, Option<String>),
    /// Drop everything (the sender lost messages).
    Flush,
}

fn encode_message(instance: u64, notice: &Notice) -> String {
    match notice {
        Notice::Key(key, version, value) => {
            let version = version.map_or_else(|| "-".to_owned(), |v| v.to_string());
            let mut text = format!("tc1 {instance:x} {version} {}", encode_key(key));
            if let Some(json) = value {
                text.push(' ');
                text.push_str(json);
            }
            text
        }
        Notice::Flush => format!("tc1 {instance:x} * "),
    }
}

fn decode_message(text: &str) -> Option<(u64, Notice)> {
    let mut parts = text.splitn(5, ' ');
    if parts.next()? != "tc1" {
        return None;
    }
    let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
    let version = parts.next()?;
    let key = parts.next()?;
    let value = parts.next().map(str::to_owned);
    let notice = match version {
        "*" => Notice::Flush,
        "-" => Notice::Key(decode_key(key)?, None, None),
        v => Notice::Key(decode_key(key)?, Some(v.parse().ok()?), value),
    };
    Some((instance, notice))
}

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

/// What the sender has to send: fresh messages in order, then retries.
#[derive(Default)]
struct Outbox {
    fresh: VecDeque<Notice>,
    /// Messages that failed, the latest version per key (their values dropped: a receiver
    /// evicts instead of replacing).
    retry: HashMap<String, Option<Version>>,
    /// Too many piled up: the next send is "flush everything", and they are dropped.
    overflowed: bool,
    /// Messages in the send running now.
    sending: usize,
    /// The last send failed: the sender waits before the next.
    failing: bool,
}

impl Outbox {
    fn len(&self) -> usize {
        self.fresh.len() + self.retry.len() + usize::from(self.overflowed) + self.sending
    }

    /// Keeps a message that failed (or could not be sent), coalesced per key.
    fn keep(&mut self, notice: Notice) {
        match notice {
            Notice::Flush => self.overflowed = true,
            Notice::Key(key, version, _) => {
                if self.retry.len() >= MAX_PENDING && !self.retry.contains_key(&key) {
                    self.overflow();
                    return;
                }
                let slot = self.retry.entry(key).or_insert(version);
                *slot = match (*slot, version) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        }
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.retry.clear();
        self.fresh.clear();
    }

    /// The next messages to send, in order: a flush if one is owed, then retries, then fresh
    /// ones.
    fn take(&mut self) -> Vec<Notice> {
        let mut batch = Vec::new();
        if std::mem::take(&mut self.overflowed) {
            batch.push(Notice::Flush);
        }
        let retries: Vec<String> = self.retry.keys().take(SEND_BATCH).cloned().collect();
        for key in retries {
            let version = self.retry.remove(&key).expect("listed");
            batch.push(Notice::Key(key, version, None));
        }
        while batch.len() < SEND_BATCH {
            let Some(notice) = self.fresh.pop_front() else {
                break;
            };
            batch.push(notice);
        }
        self.sending = batch.len();
        batch
    }
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

/// The sender: sends what is queued, in order, and keeps what fails for a retry every
/// [`RETRY_EVERY`]. Logs when publishing starts failing and when it works again, not per
/// message. Ends with the backplane.
async fn send_queued(backplane: Weak<Inner>) {
    loop {
        let failed = {
            let Some(inner) = backplane.upgrade() else {
                return;
            };
            let this = RedisBackplane { inner };
            let batch = this.outbox().take();
            if batch.is_empty() {
                this.inner.drained.notify_waiters();
                // A message queued since `take` left a permit: this returns at once.
                let queued = Arc::clone(&this.inner.queued);
                drop(this);
                queued.notified().await;
                continue;
            }
            let result = this.send(&batch).await;
            let mut outbox = this.outbox();
            outbox.sending = 0;
            let failed = result.is_err();
            if failed {
                this.inner.publish_errors.incr();
                for notice in batch {
                    outbox.keep(notice);
                }
            }
            if std::mem::replace(&mut outbox.failing, failed) != failed {
                match &result {
                    Err(error) => tracing::warn!(%error, "backplane cannot publish; retrying"),
                    Ok(()) => tracing::info!("backplane publishes again"),
                }
            }
            failed
        };
        if failed {
            tokio::time::sleep(RETRY_EVERY).await;
        }
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

/// The subscriber: (re)subscribes, flushes the local tiers each time it does (messages sent
/// before were not heard), applies messages, and checks the subscription. Ends when the chain
/// or the backplane is dropped, without waiting for a message.
async fn listen<K: StorageKey, V: Value + DeserializeOwned>(
    backplane: Weak<Inner>,
    chain: WeakTieredCache<K, V>,
) {
    let mut first = true;
    let mut failures = 0u32;
    loop {
        let Some(inner) = backplane.upgrade() else {
            return;
        };
        if chain.upgrade().is_none() {
            return;
        }
        let servers = inner.clients.len();
        let server = inner.subscribe_to.load(Ordering::Relaxed) % servers;
        let connected = tokio::time::timeout(inner.connect_timeout, async {
            let mut pubsub = inner.clients[server].get_async_pubsub().await?;
            pubsub.subscribe(&inner.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            _ => {
                if !inner.tried.swap(true, Ordering::AcqRel) {
                    inner.tried_once.notify_waiters();
                }
                // Try the next server; wait once every server has failed.
                inner
                    .subscribe_to
                    .store((server + 1) % servers, Ordering::Relaxed);
                drop(inner);
                if server + 1 < servers {
                    continue;
                }
                failures += 1;
                tokio::time::sleep(resubscribe_backoff(failures)).await;
                continue;
            }
        };
        failures = 0;
        inner.subscribed.store(true, Ordering::Relaxed);
        {
            // Messages sent while there was no subscription (before the first one too, while
            // reads filled the memory tier) were not heard.
            if !first {
                inner.gaps.incr();
            }
            let Some(chain) = chain.upgrade() else { return };
            chain.flush_local().await;
        }
        first = false;
        if !inner.tried.swap(true, Ordering::AcqRel) {
            inner.tried_once.notify_waiters();
        }
        let (sink, mut stream) = pubsub.split();
        // The health check pings from its own task and says when the subscription is dead.
        let (dead, mut died) = tokio::sync::oneshot::channel::<()>();
        let checker = AbortOnDrop(tokio::spawn(health_check(
            sink,
            inner.timeout.max(Duration::from_millis(200)),
            dead,
        )));
        let instance = inner.instance;
        // Only a weak handle while waiting: dropping the backplane's last user ends this task.
        let received = Weak::clone(&backplane);
        drop(inner);
        let mut alive = tokio::time::interval(ALIVE_CHECK_EVERY);
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                _ = &mut died => None,
                _ = alive.tick() => {
                    if chain.upgrade().is_none() || received.upgrade().is_none() {
                        return;
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let Some((sender, notice)) = std::str::from_utf8(message.get_payload_bytes())
                .ok()
                .and_then(decode_message)
            else {
                tracing::debug!("backplane message not understood; ignored");
                continue;
            };
            if sender == instance {
                continue;
            }
            let (Some(chain), Some(inner)) = (chain.upgrade(), received.upgrade()) else {
                return;
            };
            match notice {
                Notice::Flush => chain.flush_local().await,
                Notice::Key(text, version, json) => {
                    // A value that does not decode only costs the shortcut: evict.
                    let value = json
                        .and_then(|j| serde_json::from_str::<V>(&j).ok())
                        .map(Arc::new);
                    if let Some(key) = K::from_storage_key(&text) {
                        let change = Change::announced(key, version, value);
                        chain.apply(Changes::from_backplane(vec![change])).await;
                    }
                }
            }
            // Counted once applied: whoever sees the count sees the change.
            inner.received.incr();
        }
        drop(checker);
        let Some(inner) = backplane.upgrade() else {
            return;
        };
        inner.subscribed.store(false, Ordering::Relaxed);
        tracing::warn!(server, "backplane subscription lost");
    }
}

/// The wait before resubscribing after `failures` failed attempts in a row: doubling from the
/// first, capped, with up to half off at random so that instances do not reconnect in step.
fn resubscribe_backoff(failures: u32) -> Duration {
    let (first, longest) = RESUBSCRIBE_BACKOFF;
    let wait = first
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(longest);
    wait.mul_f64(1.0 - fastrand::f64() / 2.0)
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// PINGs the subscription every [`HEALTH_CHECK_EVERY`]; reports it dead when a PING fails or
/// does not answer within `limit`.
async fn health_check(
    mut sink: redis::aio::PubSubSink,
    limit: Duration,
    dead: tokio::sync::oneshot::Sender<()>,
) {
    let mut every = tokio::time::interval(HEALTH_CHECK_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let alive = tokio::time::timeout(limit, sink.ping::<redis::Value>()).await;
        if !matches!(alive, Ok(Ok(_))) {
            tracing::warn!("backplane subscription unresponsive; reconnecting");
            let _ = dead.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for notice in [
            Notice::Key("a b:c".into(), Some(42), None),
            Notice::Key("k".into(), Some(7), Some("{\"a\": \"x y z\"}".into())),
            Notice::Key("ünï".into(), None, None),
            Notice::Key(String::new(), Some(1), None),
            Notice::Flush,
        ] {
            let text = encode_message(0xabc, &notice);
            assert_eq!(decode_message(&text), Some((0xabc, notice)), "{text}");
        }
        assert_eq!(decode_message("tc2 1 2 x"), None);
        assert_eq!(decode_message("tc1 zz 2 x"), None);
        assert_eq!(decode_message("tc1 1 two x"), None);
        assert_eq!(decode_message("tc1 1 2 a:b"), None, "not an encoded key");
    }

    fn key(k: &str, version: Option<Version>) -> Notice {
        Notice::Key(k.into(), version, None)
    }

    #[test]
    fn a_failed_message_is_kept_once_per_key_at_its_latest_version() {
        let mut outbox = Outbox::default();
        outbox.keep(key("a", Some(3)));
        outbox.keep(Notice::Key("a".into(), Some(5), Some("{}".into())));
        outbox.keep(key("a", Some(4)));
        assert_eq!(
            outbox.retry.get("a"),
            Some(&Some(5)),
            "the latest version, no value"
        );
        outbox.keep(key("a", None));
        assert_eq!(
            outbox.retry.get("a"),
            Some(&None),
            "a manual invalidation drops all"
        );
        outbox.keep(key("a", Some(9)));
        assert_eq!(outbox.retry.get("a"), Some(&None));
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn past_the_retry_bound_everything_kept_becomes_one_flush_sent_first() {
        let mut outbox = Outbox::default();
        for i in 0..MAX_PENDING {
            outbox.keep(key(&i.to_string(), Some(1)));
        }
        assert!(!outbox.overflowed);
        outbox.fresh.push_back(key("fresh", Some(1)));
        // A key already kept is coalesced, not counted again.
        outbox.keep(key("0", Some(2)));
        assert!(!outbox.overflowed);
        outbox.keep(key("one too many", Some(1)));
        assert!(outbox.overflowed);
        assert!(outbox.retry.is_empty() && outbox.fresh.is_empty());
        assert_eq!(outbox.len(), 1);

        outbox.fresh.push_back(key("after", Some(1)));
        let batch = outbox.take();
        assert_eq!(batch, vec![Notice::Flush, key("after", Some(1))]);
        assert!(!outbox.overflowed);
    }

    #[test]
    fn a_send_takes_retries_before_fresh_messages_up_to_a_batch() {
        let mut outbox = Outbox::default();
        outbox.keep(key("old", Some(1)));
        for i in 0..SEND_BATCH {
            outbox.fresh.push_back(key(&i.to_string(), Some(2)));
        }
        let batch = outbox.take();
        assert_eq!(batch.len(), SEND_BATCH);
        assert_eq!(batch[0], key("old", Some(1)));
        assert_eq!(batch[1], key("0", Some(2)), "fresh ones in order");
        assert_eq!(outbox.sending, SEND_BATCH);
        assert_eq!(outbox.fresh.len(), 1, "the rest waits for the next send");
    }

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
