//! [`UserConfigStorage`]: the seed design's API over a [`TieredCache`] of memory, optionally
//! Redis, and a database.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiercache_core::{CacheTier, Origin, TieredCache, Version};
use tiercache_memory::MemoryTier;
use tiercache_redis::{RedisBackplane, RedisTier};

use crate::Key;
use crate::config::UserConfig;
use crate::consistency::{Tier, Verifier};
use crate::database::Database;
use crate::error::{Error, Result};
use crate::stats::{CacheStats, DatabaseStats, MemoryCacheStats, RedisCacheStats};
use crate::watch::{WatchedConfig, Watches};

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
/// doubled per conflict, at most 64 ms (full jitter, so that racing writers spread out). For
/// callers that run their own compare-and-set loop (`userconfig serve`'s conditional
/// requests) and should back off as [`UserConfigStorage::modify_user_config`] does.
#[must_use]
pub fn conflict_backoff(attempt: u32) -> Duration {
    let ceiling_us = 1_000u64 << attempt.min(6);
    Duration::from_micros(fastrand::u64(0..=ceiling_us))
}

/// The key [`UserConfigStorage::ping_database`] reads: no user id has a control character.
const READINESS_KEY: &str = "\u{1}readiness";

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
    pub(crate) cache: TieredCache<Key, UserConfig>,
    pub(crate) memory: Arc<MemoryTier<Key, UserConfig>>,
    pub(crate) redis: Option<Arc<RedisTier<Key, UserConfig>>>,
    pub(crate) backplane: Option<RedisBackplane>,
    pub(crate) database: Database,
    pub(crate) max_config_bytes: usize,
    /// The users watched ([`UserConfigStorage::watch`], `watch.rs`).
    pub(crate) watches: Arc<Watches>,
    /// The consistency checks of a share of the reads the caches answer (`consistency.rs`).
    pub(crate) verifier: Arc<Verifier>,
    /// Every change this instance learns of, numbered (`changes.rs`).
    pub(crate) change_log: Arc<crate::changes::ChangeLog>,
    /// Who this handle's writes are made by, for the history ([`UserConfigStorage::by`]).
    pub(crate) author: Option<Arc<str>>,
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
            Ok(hit) => {
                if self.verifier.sampled() {
                    self.verifier.sample(
                        self.cache.downgrade(),
                        user_id,
                        hit.version,
                        Tier::Memory,
                    );
                }
                Ok(hit)
            }
            // Boxed, so that the future of a hit stays small (it is built on every call).
            Err(miss) => Box::pin(self.fetch_miss(user_id, miss)).await,
        }
    }

    async fn fetch_miss(
        &self,
        user_id: &str,
        miss: tiercache_core::Miss,
    ) -> Result<tiercache_core::Fetched<UserConfig>> {
        let fetched = self.cache.fetch_after(&user_id.to_owned(), miss).await?;
        if let Origin::Tier(i) = fetched.origin
            && self.verifier.sampled()
        {
            let tier = if i == 0 { Tier::Memory } else { Tier::Redis };
            self.verifier
                .sample(self.cache.downgrade(), user_id, fetched.version, tier);
        }
        Ok(fetched)
    }

    /// Like [`get_user_config`](Self::get_user_config), with the version and the tier that
    /// answered (version 0 and [`Answer::Database`] for an unknown user's defaults).
    pub async fn fetch_user_config(&self, user_id: &str) -> Result<FetchedConfig> {
        let fetched = self.fetch(user_id).await?;
        Ok(Self::answer(user_id, fetched))
    }

    /// Like [`fetch_user_config`](Self::fetch_user_config), at version `min_version` or newer:
    /// read your writes on any instance. A client that wrote version `n` through one instance
    /// and reads through another with `min_version = n` never sees its write undone, even when
    /// that instance's caches have not heard of it yet: when the cached copy is older, the
    /// database answers (and the caches are filled with it). Costs nothing more when the
    /// cached copy is new enough.
    ///
    /// When the database itself holds an older version (a `min_version` that was never this
    /// user's, since every change gets a version greater than the last) or nothing (deleted
    /// since), its answer is returned: nothing newer exists.
    ///
    /// # Errors
    /// As [`load_user_config`](Self::load_user_config) when the database is asked.
    pub async fn fetch_user_config_at_least(
        &self,
        user_id: &str,
        min_version: Version,
    ) -> Result<FetchedConfig> {
        let fetched = self.fetch(user_id).await?;
        // A cached "not found" carries its delete's version: newer than any write before it.
        if fetched.version >= min_version {
            return Ok(Self::answer(user_id, fetched));
        }
        let loaded = self.cache.load(&user_id.to_owned()).await?;
        Ok(Self::answer(user_id, loaded))
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
        let key = user_id.to_owned();
        let version = match &self.author {
            None => self.cache.update(&key, Arc::clone(&stored)).await?,
            Some(author) => {
                self.cache
                    .update_by(&key, Arc::clone(&stored), None, author)
                    .await?
            }
        };
        self.wrote(user_id, Some(stored), version);
        Ok(version)
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
        let key = user_id.to_owned();
        let version = match &self.author {
            None => {
                self.cache
                    .update_if(&key, expected_version, Arc::clone(&stored))
                    .await?
            }
            Some(author) => {
                self.cache
                    .update_by(&key, Arc::clone(&stored), Some(expected_version), author)
                    .await?
            }
        };
        self.wrote(user_id, Some(stored), version);
        Ok(version)
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
        self.try_modify_user_config(user_id, |config| {
            change(config);
            Ok(())
        })
        .await
    }

    /// [`modify_user_config`](Self::modify_user_config) with a change that may refuse: an
    /// error from `change` ends the modification at once, with nothing written (an HTTP merge
    /// patch that does not fit the stored configuration, say).
    ///
    /// # Errors
    /// `change`'s error; otherwise as [`modify_user_config`](Self::modify_user_config).
    pub async fn try_modify_user_config<F>(&self, user_id: &str, mut change: F) -> Result<Version>
    where
        F: FnMut(&mut UserConfig) -> Result<()> + Send,
    {
        check_user_id(user_id)?;
        let mut current = self.fetch_user_config(user_id).await?;
        for attempt in 1..=MAX_MODIFY_ATTEMPTS {
            let mut config = (*current.config).clone();
            change(&mut config)?;
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

    /// Whether the database answers: one read of the database itself (no cache, nothing
    /// cached), for readiness checks.
    ///
    /// # Errors
    /// The database's error.
    pub async fn ping_database(&self) -> Result<()> {
        self.database
            .source()
            .get(&READINESS_KEY.to_owned())
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Creates or upgrades the database's table, change log and functions now (PostgreSQL:
    /// what a role that may create them runs once per release, `userconfig migrate`; SQLite:
    /// done when the storage was built). Returns the database's kind.
    ///
    /// # Errors
    /// The database's error (a role without the privileges gets the database's refusal).
    pub async fn migrate(&self) -> Result<&'static str> {
        self.database.migrate().await?;
        Ok(self.database.backend())
    }

    /// Grants a PostgreSQL role what a service needs on the database's objects and nothing
    /// more (read and write the table, number versions, log and follow changes; no creating):
    /// the storage's own role runs it once, after [`migrate`](Self::migrate), and services
    /// then connect as `role` with [`run_migrations(false)`](crate::UserConfigStorageBuilder::run_migrations).
    ///
    /// # Errors
    /// [`Error::Settings`] for another database or a role that is not a plain lower-case
    /// identifier; the database's refusal otherwise.
    pub async fn grant_to(&self, role: &str) -> Result<()> {
        self.database.grant_to(role).await
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
        let key = user_id.to_owned();
        let version = match &self.author {
            None => self.cache.delete(&key).await?,
            Some(author) => self.cache.delete_by(&key, None, author).await?,
        };
        self.wrote(user_id, None, version);
        Ok(version)
    }

    /// [`delete_user_config`](Self::delete_user_config) only if the stored configuration is
    /// still at `expected_version`, checked and deleted as one step in the database: a delete
    /// that cannot remove a configuration someone changed since it was read. Returns the
    /// delete's version, or 0 if nothing was stored and `expected_version` was 0.
    ///
    /// # Errors
    /// [`Error::Conflict`] with the stored version (0: none is stored) if it is not
    /// `expected_version` (nothing is deleted); otherwise as
    /// [`delete_user_config`](Self::delete_user_config).
    pub async fn delete_user_config_if(
        &self,
        user_id: &str,
        expected_version: Version,
    ) -> Result<Version> {
        check_user_id(user_id)?;
        let key = user_id.to_owned();
        let version = match &self.author {
            None => self.cache.delete_if(&key, expected_version).await?,
            Some(author) => {
                self.cache
                    .delete_by(&key, Some(expected_version), author)
                    .await?
            }
        };
        self.wrote(user_id, None, version);
        Ok(version)
    }

    /// Whether `config` may be stored for `user_id`, checked as every write checks it, with
    /// no I/O: for a caller that reads before it writes (an HTTP precondition, say) and
    /// refuses bad input first.
    ///
    /// # Errors
    /// As [`update_user_config`](Self::update_user_config)'s input errors.
    pub fn check_user_config(&self, user_id: &str, config: &UserConfig) -> Result<()> {
        self.prepare(user_id, config).map(drop)
    }

    /// This storage, with its writes made by `author`: the history records that name for each
    /// change (PostgreSQL; SQLite keeps no author), instead of the database session's
    /// `application_name`. For a service writing for its callers (`userconfig serve` names the
    /// token, or `user:` and the end user's subject). Shares everything with `self`.
    #[must_use]
    pub fn by(&self, author: &str) -> UserConfigStorage {
        UserConfigStorage {
            author: Some(Arc::from(author)),
            ..self.clone()
        }
    }

    /// Tells `user_id`'s watches of a write this storage made (before the call returns, so that
    /// a watch reads its own instance's writes at once).
    fn wrote(&self, user_id: &str, config: Option<Arc<UserConfig>>, version: Version) {
        let next = match config {
            Some(config) => WatchedConfig::stored(config, version),
            None if version == 0 => return,
            None => WatchedConfig::defaults(user_id, version),
        };
        self.watches.offer(user_id, next, false);
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
            consistency: self.verifier.stats(),
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
