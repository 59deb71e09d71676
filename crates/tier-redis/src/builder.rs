//! Configuring a [`RedisTier`]: every setting with its default, checked when built.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use redis::{Client, RedisError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{Clock, Error, Result, StorageKey};

use crate::envelope::Codec;
use crate::link::{Link, Redacted};
use crate::scripts::Scripts;
use crate::tier::{Config, RedisTier, Stats};
use crate::{
    DEFAULT_COMPRESS_ABOVE, DEFAULT_CONNECT_TIMEOUT, DEFAULT_JITTER, DEFAULT_NAME, DEFAULT_PREFIX,
    DEFAULT_TIMEOUT, DEFAULT_TTL, DEFAULT_URL,
};

/// Configures a [`RedisTier`]; see [`RedisTier::builder`].
#[must_use]
pub struct RedisTierBuilder<K, V> {
    pub(crate) url: String,
    pub(crate) root_certificate: Option<Vec<u8>>,
    #[cfg(feature = "cluster")]
    pub(crate) cluster_nodes: Vec<String>,
    pub(crate) config: Config,
    pub(crate) tombstone_ttl: Option<Duration>,
    pub(crate) clock: Clock,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
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
