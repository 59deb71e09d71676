//! The tier: its state, its accessors, reading and decoding entries, and the [`CacheTier`]
//! implementation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Value as RedisValue};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tiercache_core::{
    CacheTier, Clock, Counter, Entry, Error, Result, StorageKey, TierStats, Timestamp, Version,
};

use crate::builder::RedisTierBuilder;
use crate::codec::{decode_payload, encode_payload};
use crate::envelope::{Codec, Stored};
use crate::error::{Undecodable, Unserializable};
#[cfg(feature = "cluster")]
use crate::link::Conn;
use crate::link::{Link, Redacted};
use crate::scripts::Scripts;
#[cfg(feature = "cluster")]
use crate::slots;
use crate::{BATCH, encode_key, envelope};

/// The Redis tier. See the [crate docs](crate).
pub struct RedisTier<K, V> {
    pub(crate) client: Client,
    pub(crate) seeds: Vec<Client>,
    #[cfg(feature = "cluster")]
    pub(crate) cluster: Option<redis::cluster::ClusterClient>,
    pub(crate) link: Arc<Link>,
    pub(crate) scripts: Scripts,
    pub(crate) config: Config,
    pub(crate) clock: Clock,
    pub(crate) stats: Stats,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) prefix: String,
    pub(crate) ttl: Duration,
    pub(crate) tombstone_ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) compress_above: Option<usize>,
    pub(crate) codec: Codec,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) errors: Counter,
    pub(crate) corrupt: Counter,
    pub(crate) rejected: Counter,
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

    /// The redis client (to open a [`RedisBackplane`](crate::RedisBackplane) on the same server and settings); for a
    /// cluster, its first seed node.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The clients a [`RedisBackplane`](crate::RedisBackplane) on this tier's Redis should use
    /// ([`RedisBackplane::with_clients`](crate::RedisBackplane::with_clients)): the server, or every seed node of the cluster.
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
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static> RedisTier<K, V> {
    pub(crate) fn ttl_for(&self, entry: &Entry<V>, now: Timestamp) -> Duration {
        let ttl = tiercache_core::util::jittered_ttl(self.config.ttl, self.config.jitter);
        entry.capped_expiry(now, ttl).saturating_since(now)
    }

    /// Turns one stored value (its envelope carries the expiry) into an entry; deletes and
    /// counts undecodable ones.
    pub(crate) async fn decode_one(
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
    pub(crate) async fn read(&self, redis_keys: &[String]) -> Result<Vec<Option<Entry<V>>>> {
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
pub(crate) fn unix_ms_now() -> u64 {
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
