//! [`UserConfigStorage`]: the seed design's API over a [`TieredCache`] of memory, optionally
//! Redis, and a database.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache_core::{
    CacheTier, ChainStats, Clock, Origin, Source, TierStats, TieredCache, Version,
};
use tiercache_memory::MemoryTier;
use tiercache_postgres::PostgresTier;
use tiercache_redis::{BackplaneStats, RedisBackplane, RedisTier};
use tiercache_sqlite::SqliteTier;

use crate::config::UserConfig;
use crate::error::{Error, Result};

/// Default memory tier capacity (the seed's 500 entries).
pub const DEFAULT_MEMORY_CAPACITY: usize = 500;
/// Default memory tier TTL (the seed's 5 minutes).
pub const DEFAULT_MEMORY_TTL: Duration = Duration::from_secs(300);
/// Default Redis TTL (the seed's 30 minutes).
pub const DEFAULT_REDIS_TTL: Duration = Duration::from_secs(1800);
/// Default Redis key prefix.
pub const DEFAULT_REDIS_PREFIX: &str = "userconfig:";
/// The variable [`UserConfigStorage::from_env`] reads a Redis Cluster's seed nodes from
/// (comma-separated URLs; feature `cluster`).
#[cfg(feature = "cluster")]
pub const REDIS_CLUSTER_NODES_VAR: &str = "REDIS_CLUSTER_NODES";
/// Default largest configuration accepted, serialized (64 KiB).
pub const DEFAULT_MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// The embedded default's database file, when neither `DATABASE_URL` nor a path is given.
pub const DEFAULT_SQLITE_PATH: &str = "userconfig.sqlite3";
/// Most attempts [`UserConfigStorage::modify_user_config`] makes before it gives up with
/// [`Error::TooManyConflicts`]. With eight writers incrementing one user's counter as fast as
/// they can (`tests/writers.rs`), a retry after a conflict conflicted again about two times in
/// three (one run: 493 conflicts in 893 attempts, at most 14 in a row); fifty makes giving up
/// a one-in-a-hundred-million event there, while a caller stuck behind a writer that never
/// stops still gets an answer within seconds.
pub const MAX_MODIFY_ATTEMPTS: u32 = 50;

/// The wait after the `attempt`-th conflict of a modification: a random time up to 1 ms
/// doubled per conflict, at most 64 ms (full jitter, so that racing writers spread out).
fn conflict_backoff(attempt: u32) -> Duration {
    let ceiling_us = 1_000u64 << attempt.min(6);
    Duration::from_micros(fastrand::u64(0..=ceiling_us))
}

type Key = String;

/// Which authoritative database the storage reads and writes.
#[derive(Clone)]
enum Database {
    Postgres(Arc<PostgresTier<Key, UserConfig>>),
    Sqlite(Arc<SqliteTier<Key, UserConfig>>),
    Custom(Arc<dyn Source<Key, UserConfig>>),
}

impl Database {
    fn tier(&self) -> Arc<dyn Source<Key, UserConfig>> {
        match self {
            Database::Postgres(t) => t.clone(),
            Database::Sqlite(t) => t.clone(),
            Database::Custom(t) => t.clone(),
        }
    }

    /// How long after the chain gave up on a write it may still commit, and a margin.
    fn write_settle(&self) -> Duration {
        let inside = match self {
            Database::Postgres(t) => t.longest_write(),
            Database::Sqlite(t) => t.longest_write(),
            Database::Custom(_) => return tiercache_core::DEFAULT_WRITE_SETTLE,
        };
        inside + Duration::from_secs(1)
    }

    fn backend(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::Sqlite(_) => "sqlite",
            Database::Custom(_) => "custom",
        }
    }
}

/// User configurations served from memory, then Redis (if configured), then the database.
///
/// The seed design's API: [`get_user_config`](Self::get_user_config) (an unknown user gets the
/// default configuration), [`update_user_config`](Self::update_user_config) (database first,
/// then every cache is invalidated and repopulated),
/// [`invalidate_user_config_cache`](Self::invalidate_user_config_cache),
/// [`clear_memory_cache`](Self::clear_memory_cache) and
/// [`get_cache_stats`](Self::get_cache_stats).
///
/// ```no_run
/// # async fn demo() -> userconfig::Result<()> {
/// use userconfig::UserConfigStorage;
///
/// // REDIS_URL and DATABASE_URL if set; else memory over an embedded SQLite file.
/// let storage = UserConfigStorage::from_env().await?;
/// let mut config = (*storage.get_user_config("alice").await?).clone();
/// config.preferences.theme = "dark".into();
/// storage.update_user_config("alice", &config).await?;
/// println!("{}", serde_json::to_string_pretty(&storage.get_cache_stats()).unwrap());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct UserConfigStorage {
    cache: TieredCache<Key, UserConfig>,
    memory: Arc<MemoryTier<Key, UserConfig>>,
    redis: Option<Arc<RedisTier<Key, UserConfig>>>,
    backplane: Option<RedisBackplane>,
    database: Database,
    max_config_bytes: usize,
}

impl fmt::Debug for UserConfigStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfigStorage")
            .field("memory", &self.memory)
            .field("redis", &self.redis)
            .field("backplane", &self.backplane)
            .field("database", &self.database.backend())
            .field("max_config_bytes", &self.max_config_bytes)
            .finish()
    }
}

/// Checks a user id before any I/O: not empty, at most 256 bytes, no control characters.
pub fn check_user_id(user_id: &str) -> Result<()> {
    let reason = if user_id.is_empty() {
        "it is empty"
    } else if user_id.len() > MAX_USER_ID_BYTES {
        "it is longer than 256 bytes"
    } else if has_control(user_id.as_bytes()) {
        "it holds control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidUserId { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The word-at-a-time pre-check says "maybe" for every string with a control character
        /// (and exactly for the bytes it names), whatever its length and where the byte is.
        #[test]
        fn the_word_check_finds_every_suspicious_byte(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let expected = bytes.iter().any(|&b| b < 0x20 || b == 0x7F || b == 0xC2);
            proptest::prop_assert_eq!(maybe_control(&bytes), expected);
        }
    }

    #[test]
    fn control_characters_are_found_by_bytes_as_by_chars() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = format!("ab{c}cd");
            assert_eq!(has_control(s.as_bytes()), c.is_control(), "{:?}", c);
        }
    }
}

/// Whether `bytes` (valid UTF-8) hold a control character (Unicode category Cc: U+0000 to
/// U+001F, U+007F, U+0080 to U+009F), scanning bytes rather than decoding characters: this runs
/// on every read.
#[inline]
fn has_control(bytes: &[u8]) -> bool {
    // Almost every id holds no byte that could start a control character: a check of eight
    // bytes at a time settles it (the exact scan below runs only when one might).
    if !maybe_control(bytes) {
        return false;
    }
    bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20
            || b == 0x7F
            || (b == 0xC2 && bytes.get(i + 1).is_some_and(|n| (0x80..0xA0).contains(n)))
    })
}

/// Whether `bytes` holds a byte below 0x20, 0x7F or 0xC2 (the lead byte of U+0080 to U+00BF),
/// eight bytes at a time: no false answer either way.
#[inline]
fn maybe_control(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether a byte of `x` is zero, and whether one is below `n` (for `n` <= 0x80).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let word = |x: u64| below(x, 0x20) || zero(x ^ (ONES * 0x7F)) || zero(x ^ (ONES * 0xC2));
    let load = |chunk: &[u8]| {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        u64::from_ne_bytes(eight)
    };
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| b < 0x20 || b == 0x7F || b == 0xC2);
    }
    // Whole words, then the last eight bytes (overlapping the words already seen).
    bytes.chunks_exact(8).any(|chunk| word(load(chunk))) || word(load(&bytes[bytes.len() - 8..]))
}

impl UserConfigStorage {
    /// Starts configuring a storage.
    pub fn builder() -> UserConfigStorageBuilder {
        UserConfigStorageBuilder::default()
    }

    /// A storage configured from the environment: `REDIS_URL` (optional: without it the chain
    /// is memory, then the database), or with feature `cluster` `REDIS_CLUSTER_NODES` (a Redis
    /// Cluster's seed node URLs, comma-separated), and `DATABASE_URL` (`postgres://…`, or
    /// `sqlite:path`; without it, the embedded default: an SQLite file, `userconfig.sqlite3`).
    pub async fn from_env() -> Result<Self> {
        let non_empty = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut builder = Self::builder();
        if let Some(url) = non_empty("REDIS_URL") {
            builder = builder.redis_url(url);
        }
        #[cfg(feature = "cluster")]
        if let Some(nodes) = non_empty(REDIS_CLUSTER_NODES_VAR) {
            builder = builder.redis_cluster(
                nodes
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned),
            );
        }
        if let Some(url) = non_empty("DATABASE_URL") {
            builder = builder.database_url(url);
        }
        builder.build().await
    }

    /// The configuration of `user_id`; an unknown user gets the default configuration (with
    /// its `user_id` set), not an error.
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] before any I/O; a transient [`Error::Cache`] when the database
    /// is unreachable and no cached copy is usable; a corrupt stored configuration is an error
    /// naming the user, never replaced by defaults.
    pub async fn get_user_config(&self, user_id: &str) -> Result<Arc<UserConfig>> {
        let fetched = self.fetch(user_id).await?;
        Ok(fetched
            .value
            .unwrap_or_else(|| Arc::new(UserConfig::default_for(user_id))))
    }

    /// The chain's answer for `user_id`. A memory hit builds the key in a per-thread buffer
    /// instead of allocating one (the key is owned only on a miss).
    async fn fetch(&self, user_id: &str) -> Result<tiercache_core::Fetched<UserConfig>> {
        check_user_id(user_id)?;
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let peeked = KEY.with(|buffer| {
            let mut key = buffer.borrow_mut();
            key.clear();
            key.push_str(user_id);
            self.cache.peek(&key)
        });
        match peeked {
            Ok(hit) => Ok(hit),
            // Boxed, so that the future of a hit stays small (it is built on every call).
            Err(miss) => Box::pin(self.fetch_miss(user_id, miss)).await,
        }
    }

    async fn fetch_miss(
        &self,
        user_id: &str,
        miss: tiercache_core::Miss,
    ) -> Result<tiercache_core::Fetched<UserConfig>> {
        Ok(self.cache.fetch_after(&user_id.to_owned(), miss).await?)
    }

    /// Like [`get_user_config`](Self::get_user_config), with the version and the tier that
    /// answered (version 0 and [`Answer::Database`] for an unknown user's defaults).
    pub async fn fetch_user_config(&self, user_id: &str) -> Result<FetchedConfig> {
        let fetched = self.fetch(user_id).await?;
        Ok(Self::answer(user_id, fetched))
    }

    fn answer(user_id: &str, fetched: tiercache_core::Fetched<UserConfig>) -> FetchedConfig {
        let answered_by = match fetched.origin {
            Origin::Tier(0) => Answer::Memory,
            Origin::Tier(_) => Answer::Redis,
            Origin::Stale(_) => Answer::Stale,
            _ => Answer::Database,
        };
        match fetched.value {
            Some(config) => FetchedConfig {
                config,
                version: fetched.version,
                stored: true,
                answered_by,
            },
            // A cached "not found" carries the version of the delete that caused it; a
            // compare-and-set expects 0 for "nothing stored".
            None => FetchedConfig {
                config: Arc::new(UserConfig::default_for(user_id)),
                version: 0,
                stored: false,
                answered_by,
            },
        }
    }

    /// The configurations of `user_ids`, in order, with one batch call per tier (for cache
    /// warming and bulk reads). Unknown users get the default configuration.
    pub async fn get_user_configs(&self, user_ids: &[&str]) -> Result<Vec<Arc<UserConfig>>> {
        for id in user_ids {
            check_user_id(id)?;
        }
        let keys: Vec<Key> = user_ids.iter().map(|id| (*id).to_owned()).collect();
        let found = self.cache.get_many(&keys).await?;
        Ok(found
            .into_iter()
            .zip(user_ids)
            .map(|(c, id)| c.unwrap_or_else(|| Arc::new(UserConfig::default_for(*id))))
            .collect())
    }

    /// Loads the configurations of `user_ids` into memory and Redis ahead of demand (the seed's
    /// "cache warming"), `batch` users per batch call to each tier. Returns how many users have
    /// a stored configuration.
    pub async fn warm(&self, user_ids: &[&str], batch: usize) -> Result<usize> {
        for id in user_ids {
            check_user_id(id)?;
        }
        let keys: Vec<Key> = user_ids.iter().map(|id| (*id).to_owned()).collect();
        Ok(self.cache.warm(&keys, batch).await?)
    }

    /// Writes `config` for `user_id`: the database first, then every cache is invalidated and
    /// repopulated. Returns the new version. A config whose `user_id` is empty gets `user_id`.
    /// A config equal to the stored one changes nothing (no new version, no invalidation) and
    /// returns the stored version.
    ///
    /// This overwrites whatever is stored. To change a field of the stored configuration
    /// without losing another writer's change, use
    /// [`modify_user_config`](Self::modify_user_config).
    ///
    /// # Errors
    /// Input errors before any I/O: a bad user id, a `config.user_id` naming another user, a
    /// schema range violation, a config over the size limit. If the database write fails, the
    /// error is returned and no cache is touched.
    pub async fn update_user_config(&self, user_id: &str, config: &UserConfig) -> Result<Version> {
        let stored = self.prepare(user_id, config)?;
        Ok(self.cache.update(&user_id.to_owned(), stored).await?)
    }

    /// [`update_user_config`](Self::update_user_config) only if the stored configuration is
    /// still at `expected_version` (0: none is stored), checked and written as one step in the
    /// database: a compare-and-set.
    ///
    /// # Errors
    /// [`Error::Conflict`] with the stored version if someone changed the configuration since
    /// `expected_version` (nothing is written); otherwise as
    /// [`update_user_config`](Self::update_user_config).
    pub async fn update_user_config_if(
        &self,
        user_id: &str,
        expected_version: Version,
        config: &UserConfig,
    ) -> Result<Version> {
        let stored = self.prepare(user_id, config)?;
        Ok(self
            .cache
            .update_if(&user_id.to_owned(), expected_version, stored)
            .await?)
    }

    /// Reads the configuration of `user_id` (the default for an unknown user), applies
    /// `change` to it and writes it back if nobody changed it meanwhile; on a conflict it reads
    /// the database (not a cache) and tries again, up to [`MAX_MODIFY_ATTEMPTS`] times in all.
    /// Concurrent modifications, on any instance, lose nothing. `change` may run more than
    /// once. Returns the version written (or the stored one if `change` changed nothing).
    ///
    /// ```no_run
    /// # async fn demo(storage: &userconfig::UserConfigStorage) -> userconfig::Result<()> {
    /// storage
    ///     .modify_user_config("alice", |config| config.preferences.theme = "dark".into())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::TooManyConflicts`] after [`MAX_MODIFY_ATTEMPTS`] conflicts in a row; input
    /// errors (a `change` that breaks the schema, say) before the write; otherwise as
    /// [`update_user_config`](Self::update_user_config).
    pub async fn modify_user_config<F>(&self, user_id: &str, mut change: F) -> Result<Version>
    where
        F: FnMut(&mut UserConfig) + Send,
    {
        let mut current = self.fetch_user_config(user_id).await?;
        for attempt in 1..=MAX_MODIFY_ATTEMPTS {
            let mut config = (*current.config).clone();
            change(&mut config);
            match self
                .update_user_config_if(user_id, current.version, &config)
                .await
            {
                Err(Error::Conflict { .. }) if attempt < MAX_MODIFY_ATTEMPTS => {
                    tracing::debug!(attempt, "configuration changed meanwhile; reading it again");
                    // Writers racing for one user take turns instead of colliding again.
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                    current = self.load_user_config(user_id).await?;
                }
                Err(Error::Conflict { .. }) => {
                    return Err(Error::TooManyConflicts {
                        attempts: MAX_MODIFY_ATTEMPTS,
                    });
                }
                other => return other,
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The configuration of `user_id` as the database has it now, never a cached copy (the
    /// caches are filled with it).
    ///
    /// # Errors
    /// As [`get_user_config`](Self::get_user_config), but a database that cannot be reached is
    /// an error even when a stale copy is cached.
    pub async fn load_user_config(&self, user_id: &str) -> Result<FetchedConfig> {
        check_user_id(user_id)?;
        let fetched = self.cache.load(&user_id.to_owned()).await?;
        Ok(Self::answer(user_id, fetched))
    }

    /// Deletes the stored configuration of `user_id` (account deletion): the database first,
    /// then every cache holds "not found" at the delete's version, and the other instances are
    /// told. The user reads as the default configuration again; a later update wins
    /// everywhere. Returns the delete's version, or 0 if nothing was stored.
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] before any I/O; if the database delete fails, the error is
    /// returned and no cache is touched.
    pub async fn delete_user_config(&self, user_id: &str) -> Result<Version> {
        check_user_id(user_id)?;
        Ok(self.cache.delete(&user_id.to_owned()).await?)
    }

    /// `config` checked and made ready to store for `user_id`, before any I/O.
    fn prepare(&self, user_id: &str, config: &UserConfig) -> Result<Arc<UserConfig>> {
        check_user_id(user_id)?;
        if !config.user_id.is_empty() && config.user_id != user_id {
            return Err(Error::InvalidConfig(
                "config.user_id names another user than the one being updated".into(),
            ));
        }
        config.check().map_err(Error::InvalidConfig)?;
        let mut stored = config.clone();
        stored.user_id = user_id.to_owned();
        let size = serde_json::to_vec(&stored)
            .map_err(|e| Error::InvalidConfig(format!("does not serialize: {e}")))?
            .len();
        if size > self.max_config_bytes {
            return Err(Error::ConfigTooLarge {
                size,
                limit: self.max_config_bytes,
            });
        }
        Ok(Arc::new(stored))
    }

    /// Removes `user_id` from every cache tier (for a change made to the database directly).
    pub async fn invalidate_user_config_cache(&self, user_id: &str) -> Result<()> {
        check_user_id(user_id)?;
        Ok(self.cache.invalidate(&user_id.to_owned()).await?)
    }

    /// Empties the in-memory tier of this instance (for testing and debugging). Through the
    /// chain: reads running now do not put back what they read before the clear.
    pub async fn clear_memory_cache(&self) {
        // The top tier is in-process and cannot fail.
        let _ = self.cache.clear_tier(0).await;
    }

    /// Waits, for at most `within`, for the work that outlives the calls that started it: an
    /// update or invalidation still running, the replay of invalidations Redis missed while it
    /// was unreachable, and the backplane messages still queued. Call it before a process
    /// exits (a command-line tool, a service shutting down): otherwise that work is lost with
    /// the process, and another instance may serve a replaced configuration until its TTL.
    ///
    /// # Errors
    /// [`Error::Cache`] with [`tiercache_core::Error::Unfinished`] naming the first tier (or
    /// the backplane) still behind at the deadline, and how much is left.
    pub async fn flush(&self, within: Duration) -> Result<()> {
        Ok(self.cache.flush(within).await?)
    }

    /// The seed's statistics (`memory_cache`, `redis_cache`, `database`) plus the chain's.
    #[must_use]
    pub fn get_cache_stats(&self) -> CacheStats {
        let chain = self.cache.stats();
        let memory = self.memory.stats();
        let redis = self.redis.as_ref().map(|r| (r.stats(), r.is_connected()));
        CacheStats {
            memory_cache: MemoryCacheStats {
                enabled: true,
                entries: memory.entries.unwrap_or(0),
                max_size: memory.max_size.unwrap_or(0),
                hits: memory.hits,
                misses: memory.misses,
                hit_rate: memory.hit_rate,
                total_requests: memory.total_requests,
                evictions: memory.evictions,
            },
            redis_cache: RedisCacheStats {
                enabled: redis.is_some(),
                connected: redis.as_ref().is_some_and(|(_, c)| *c),
                stats: redis.map(|(s, _)| s),
            },
            backplane: self.backplane.as_ref().map(RedisBackplane::stats),
            database: DatabaseStats {
                enabled: true,
                backend: self.database.backend().to_owned(),
                loads: chain.source_loads,
                // Every failed database call, as the chain saw it (the tier's own count is a
                // subset of these: adding both counted each failure twice).
                errors: chain.source.errors,
            },
            chain,
        }
    }

    /// Publishes the cache statistics through the `metrics` facade (feature `metrics`): the
    /// chain's (see [`TieredCache::export_metrics`]) and, with a backplane, counters
    /// `tiercache_backplane_{published,received,publish_errors,gaps}_total` and the gauge
    /// `tiercache_backplane_subscribed`. Call it before each scrape.
    #[cfg(feature = "metrics")]
    pub fn export_metrics(&self) {
        self.cache.export_metrics();
        if let Some(b) = &self.backplane {
            let s = b.stats();
            metrics::counter!("tiercache_backplane_published_total").absolute(s.published);
            metrics::counter!("tiercache_backplane_received_total").absolute(s.received);
            metrics::counter!("tiercache_backplane_publish_errors_total")
                .absolute(s.publish_errors);
            metrics::counter!("tiercache_backplane_gaps_total").absolute(s.gaps);
            metrics::gauge!("tiercache_backplane_subscribed").set(if s.subscribed {
                1.0
            } else {
                0.0
            });
        }
    }

    /// The chain underneath, for callers that need versions (`fetch`) or batch reads.
    #[must_use]
    pub fn chain(&self) -> &TieredCache<Key, UserConfig> {
        &self.cache
    }

    /// The backplane, if Redis is configured and the backplane is on.
    #[must_use]
    pub fn backplane(&self) -> Option<&RedisBackplane> {
        self.backplane.as_ref()
    }

    /// The Redis tier, if one is configured.
    #[must_use]
    pub fn redis(&self) -> Option<&Arc<RedisTier<Key, UserConfig>>> {
        self.redis.as_ref()
    }
}

/// Which tier answered a [`UserConfigStorage::fetch_user_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Answer {
    /// This instance's memory tier.
    Memory,
    /// Redis.
    Redis,
    /// The database (or, for an unknown user, its defaults).
    Database,
    /// A stale cached copy, because the database failed.
    Stale,
}

impl Answer {
    /// The tier's name: `memory`, `redis`, `database` or `stale`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Memory => "memory",
            Answer::Redis => "redis",
            Answer::Database => "database",
            Answer::Stale => "stale",
        }
    }
}

/// A configuration with its version and the tier that answered. (`Debug` shows no value.)
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FetchedConfig {
    /// The configuration (defaults for an unknown user).
    pub config: Arc<UserConfig>,
    /// The database's version of it (0: none is stored; the version a compare-and-set
    /// expects).
    pub version: Version,
    /// Whether a configuration is stored for the user (`false`: `config` is the default).
    pub stored: bool,
    /// Which tier answered.
    pub answered_by: Answer,
}

/// What [`UserConfigStorage::get_cache_stats`] returns: the seed's shape, plus the chain's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// The in-memory tier.
    pub memory_cache: MemoryCacheStats,
    /// The Redis tier.
    pub redis_cache: RedisCacheStats,
    /// Cross-instance invalidation over Redis pub/sub, if on.
    pub backplane: Option<BackplaneStats>,
    /// The database.
    pub database: DatabaseStats,
    /// Every tier as the chain saw it: hits, misses, errors and timeouts per tier, source loads,
    /// coalesced requests, stale copies served.
    pub chain: ChainStats,
}

/// The seed's `memory_cache` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MemoryCacheStats {
    /// Always true: the memory tier is always on.
    pub enabled: bool,
    /// Entries held now.
    pub entries: u64,
    /// Capacity.
    pub max_size: u64,
    /// Lookups answered.
    pub hits: u64,
    /// Lookups not answered.
    pub misses: u64,
    /// `hits / total_requests`.
    pub hit_rate: f64,
    /// `hits + misses`.
    pub total_requests: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
}

/// The seed's `redis_cache` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RedisCacheStats {
    /// Whether a Redis tier is configured.
    pub enabled: bool,
    /// Whether its last command reached Redis.
    pub connected: bool,
    /// The tier's own counts (hits, misses, errors, corrupt entries deleted), if enabled.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub stats: Option<TierStats>,
}

/// The seed's `database` block.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DatabaseStats {
    /// Always true: the database is the source of truth.
    pub enabled: bool,
    /// `postgres`, `sqlite`, or `custom`.
    pub backend: String,
    /// Loads that reached the database (after coalescing).
    pub loads: u64,
    /// Database calls that failed.
    pub errors: u64,
}

/// Configures a [`UserConfigStorage`]; see [`UserConfigStorage::builder`].
#[must_use]
pub struct UserConfigStorageBuilder {
    memory_capacity: usize,
    memory_ttl: Duration,
    redis_url: Option<String>,
    redis_tier: Option<Arc<RedisTier<Key, UserConfig>>>,
    redis_ttl: Duration,
    redis_prefix: String,
    #[cfg(feature = "cluster")]
    redis_cluster: Vec<String>,
    backplane: bool,
    follow_changes: bool,
    database_url: Option<String>,
    sqlite_path: Option<PathBuf>,
    custom_source: Option<Arc<dyn Source<Key, UserConfig>>>,
    shared_database: Option<Database>,
    max_config_bytes: usize,
    max_stale: Option<Duration>,
    background_backfill: bool,
    single_flight: bool,
    clock: Clock,
}

impl fmt::Debug for UserConfigStorageBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may hold passwords: say only whether they are set.
        f.debug_struct("UserConfigStorageBuilder")
            .field("memory_capacity", &self.memory_capacity)
            .field("memory_ttl", &self.memory_ttl)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("redis_cluster_nodes", &self.redis_cluster_len())
            .field("redis_ttl", &self.redis_ttl)
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("sqlite_path", &self.sqlite_path)
            .field("max_config_bytes", &self.max_config_bytes)
            .finish_non_exhaustive()
    }
}

impl Default for UserConfigStorageBuilder {
    fn default() -> Self {
        UserConfigStorageBuilder {
            memory_capacity: DEFAULT_MEMORY_CAPACITY,
            memory_ttl: DEFAULT_MEMORY_TTL,
            redis_url: None,
            redis_tier: None,
            redis_ttl: DEFAULT_REDIS_TTL,
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            #[cfg(feature = "cluster")]
            redis_cluster: Vec::new(),
            backplane: true,
            follow_changes: true,
            database_url: None,
            sqlite_path: None,
            custom_source: None,
            shared_database: None,
            max_config_bytes: DEFAULT_MAX_CONFIG_BYTES,
            max_stale: Some(tiercache_core::DEFAULT_MAX_STALE),
            background_backfill: true,
            single_flight: true,
            clock: Clock::system(),
        }
    }
}

impl UserConfigStorageBuilder {
    /// Memory tier capacity in entries. Defaults to [`DEFAULT_MEMORY_CAPACITY`].
    pub fn memory_capacity(mut self, capacity: usize) -> Self {
        self.memory_capacity = capacity;
        self
    }

    /// Memory tier TTL. Defaults to [`DEFAULT_MEMORY_TTL`].
    pub fn memory_ttl(mut self, ttl: Duration) -> Self {
        self.memory_ttl = ttl;
        self
    }

    /// Adds a Redis tier at `url` (`redis://`, `rediss://` for TLS, `user:password@` for
    /// AUTH). Without it the chain is memory, then the database.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Adds a Redis tier on a Redis Cluster reached through these seed nodes
    /// (`redis://host:port/` each; the others are discovered), instead of one server
    /// (feature `cluster`). The backplane listens and publishes on one seed node at a time (a
    /// cluster forwards every PUBLISH to all its nodes) and moves to the next when it fails.
    #[cfg(feature = "cluster")]
    pub fn redis_cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.redis_cluster = nodes.into_iter().map(Into::into).collect();
        self
    }

    fn redis_cluster_len(&self) -> usize {
        #[cfg(feature = "cluster")]
        return self.redis_cluster.len();
        #[cfg(not(feature = "cluster"))]
        0
    }

    /// Redis TTL. Defaults to [`DEFAULT_REDIS_TTL`].
    pub fn redis_ttl(mut self, ttl: Duration) -> Self {
        self.redis_ttl = ttl;
        self
    }

    /// Redis key prefix; several storages may share one Redis with different prefixes.
    /// Defaults to [`DEFAULT_REDIS_PREFIX`].
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }

    /// Whether the instance follows the database's change feed: every change committed to the
    /// table, by anyone (another instance, `psql`, another service), is applied to its memory
    /// and Redis copies as it commits. Defaults to `true`.
    pub fn follow_changes(mut self, on: bool) -> Self {
        self.follow_changes = on;
        self
    }

    /// Whether instances sharing Redis also tell each other of their updates and
    /// invalidations through Redis pub/sub (on the channel `<redis prefix>invalidations`),
    /// besides the database's change feed. The feed is the authority: it carries every
    /// committed change, by any writer, and keeps working with Redis down. The backplane is a
    /// fast path for changes made through this crate: it carries the new value, so that
    /// another instance's hot copy is replaced in place rather than dropped and read again
    /// (p50 0.16 ms against the feed's 0.87 ms from the write's return, `docs/performance.md`);
    /// it also carries manual invalidations, which the database does not see. Without Redis it
    /// does nothing. Defaults to `true`.
    pub fn backplane(mut self, on: bool) -> Self {
        self.backplane = on;
        self
    }

    /// The database: `postgres://…` / `postgresql://…`, or `sqlite:path`. Defaults to the
    /// embedded SQLite file [`DEFAULT_SQLITE_PATH`].
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// The embedded default's SQLite file (used when no database URL is given).
    pub fn sqlite_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.sqlite_path = Some(path.into());
        self
    }

    /// Uses a Redis tier you built yourself (its own prefix, timeouts, TLS settings) instead of
    /// [`redis_url`](Self::redis_url).
    pub fn redis_tier(mut self, tier: Arc<RedisTier<Key, UserConfig>>) -> Self {
        self.redis_tier = Some(tier);
        self
    }

    /// Uses a PostgreSQL tier you built yourself (its own schema, table, pool settings) instead
    /// of [`database_url`](Self::database_url).
    pub fn postgres_tier(mut self, tier: Arc<PostgresTier<Key, UserConfig>>) -> Self {
        self.shared_database = Some(Database::Postgres(tier));
        self
    }

    /// Uses an SQLite tier you built yourself instead of [`database_url`](Self::database_url).
    pub fn sqlite_tier(mut self, tier: Arc<SqliteTier<Key, UserConfig>>) -> Self {
        self.shared_database = Some(Database::Sqlite(tier));
        self
    }

    /// Uses the same database tier (and connection pool) as `other`: several storages in one
    /// process, standing for several service instances, share one database.
    pub fn share_database(mut self, other: &UserConfigStorage) -> Self {
        self.shared_database = Some(other.database.clone());
        self
    }

    /// A source tier of your own instead of a database (tests, other stores).
    pub fn source(mut self, source: Arc<dyn Source<Key, UserConfig>>) -> Self {
        self.custom_source = Some(source);
        self
    }

    /// Largest configuration accepted, serialized as JSON. Defaults to
    /// [`DEFAULT_MAX_CONFIG_BYTES`].
    pub fn max_config_bytes(mut self, bytes: usize) -> Self {
        self.max_config_bytes = bytes;
        self
    }

    /// Oldest stale copy served when the database is down (`None`: never). Defaults to
    /// [`tiercache_core::DEFAULT_MAX_STALE`].
    pub fn max_stale(mut self, age: Option<Duration>) -> Self {
        self.max_stale = age;
        self
    }

    /// Whether a database read back-fills Redis after answering rather than before (the
    /// memory tier is always filled first). Defaults to `true`: a miss does not also wait for
    /// a Redis write.
    pub fn background_backfill(mut self, on: bool) -> Self {
        self.background_backfill = on;
        self
    }

    /// Whether concurrent misses of one user share one database read. Off only to measure what
    /// it saves (`userconfig simulate --compare`). Defaults to `true`.
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// The clock for every tier. Defaults to [`Clock::system`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the storage. Connections to Redis and PostgreSQL are made lazily: the storage
    /// builds while they are down.
    ///
    /// # Errors
    /// [`Error::Settings`] for a malformed URL or setting; [`Error::Cache`] if the embedded
    /// SQLite file cannot be opened.
    pub async fn build(self) -> Result<UserConfigStorage> {
        if self.max_config_bytes == 0 {
            return Err(Error::Settings("max_config_bytes must be positive".into()));
        }
        let memory = Arc::new(
            MemoryTier::builder()
                .capacity(self.memory_capacity)
                .ttl(self.memory_ttl)
                .clock(self.clock.clone())
                .build()
                .map_err(settings)?,
        );
        let cluster = self.redis_cluster_len() > 0;
        if cluster && self.redis_url.is_some() {
            return Err(Error::Settings(
                "give either one Redis server or a Redis Cluster's nodes, not both".into(),
            ));
        }
        let redis = match (self.redis_tier, &self.redis_url) {
            (Some(tier), _) => Some(tier),
            (None, url) if url.is_some() || cluster => {
                let mut tier = RedisTier::builder()
                    .prefix(self.redis_prefix.clone())
                    .ttl(self.redis_ttl)
                    .clock(self.clock.clone());
                if let Some(url) = url {
                    tier = tier.url(url.clone());
                }
                #[cfg(feature = "cluster")]
                if cluster {
                    tier = tier.cluster(self.redis_cluster.clone());
                }
                Some(Arc::new(tier.build().map_err(settings)?))
            }
            (None, _) => None,
        };
        let database = match (self.shared_database, self.custom_source, &self.database_url) {
            (Some(database), _, _) => database,
            (None, Some(source), _) => Database::Custom(source),
            (None, None, Some(url))
                if url.starts_with("postgres://") || url.starts_with("postgresql://") =>
            {
                Database::Postgres(Arc::new(
                    PostgresTier::builder()
                        .url(url.clone())
                        .build()
                        .map_err(settings)?,
                ))
            }
            (None, None, Some(url)) if url.starts_with("sqlite:") => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                Database::Sqlite(Arc::new(SqliteTier::builder().path(path).build().await?))
            }
            (None, None, Some(_)) => {
                return Err(Error::Settings(
                    "DATABASE_URL must start with postgres://, postgresql:// or sqlite:".into(),
                ));
            }
            (None, None, None) => {
                let path = self
                    .sqlite_path
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SQLITE_PATH));
                Database::Sqlite(Arc::new(SqliteTier::builder().path(path).build().await?))
            }
        };
        let backplane = match (&redis, self.backplane) {
            (Some(redis), true) => Some(
                RedisBackplane::with_clients(
                    redis.backplane_clients(),
                    format!("{}invalidations", redis.prefix()),
                )
                .map_err(settings)?,
            ),
            _ => None,
        };
        let mut chain = TieredCache::builder()
            .shared_tier(memory.clone(), None)
            .clock(self.clock)
            .max_stale(self.max_stale)
            .background_backfill(self.background_backfill)
            .single_flight(self.single_flight)
            // A missed invalidation may leave an old copy in Redis for its whole TTL.
            .floor_ttl(self.redis_ttl.max(self.memory_ttl))
            // The database's own limits may let a write commit after the chain's 2 s.
            .write_settle(database.write_settle())
            .follow_changes(self.follow_changes);
        if let Some(redis) = &redis {
            // A read pays at most the Redis tier's own time limit (50 ms by default), however
            // Redis fails (slow, partitioned, reconnecting).
            chain = chain.shared_tier(redis.clone(), Some(redis.timeout()));
        }
        if let Some(backplane) = &backplane {
            chain = chain.backplane(Arc::new(backplane.clone()));
        }
        let cache = chain
            .shared_source(
                database.tier(),
                Some(tiercache_core::DEFAULT_SOURCE_TIMEOUT),
            )
            .build()
            .map_err(settings)?;
        if let Some(backplane) = &backplane {
            backplane.attach(&cache);
        }
        if let Some(redis) = &redis {
            // Connect now rather than on the first requests, and serve once the backplane's
            // first subscription is up (or failed): the memory tier filled before it would be
            // flushed when it comes up. Bounded by a connection attempt.
            let within = redis.connect_timeout();
            let subscribed = async {
                if let Some(backplane) = &backplane {
                    backplane.first_attempt(within).await;
                }
            };
            tokio::join!(redis.connect_within(within), subscribed);
        }
        Ok(UserConfigStorage {
            cache,
            memory,
            redis,
            backplane,
            database,
            max_config_bytes: self.max_config_bytes,
        })
    }
}

fn settings(error: tiercache_core::Error) -> Error {
    match error {
        tiercache_core::Error::Config(message) => Error::Settings(message),
        other => Error::Cache(other),
    }
}
