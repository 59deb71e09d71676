//! Per-user configuration, served fast and correctly: the `userconfig` facade of tiercache.
//!
//! [`UserConfigStorage`] implements the seed design's API over a chain of an in-process memory
//! tier (LRU, 500 entries, 5 minutes), an optional Redis tier (30 minutes, shared by every
//! service instance) and the authoritative database (PostgreSQL, or an embedded SQLite file
//! when no server is configured):
//!
//! * [`get_user_config`](UserConfigStorage::get_user_config): memory, then Redis, then the
//!   database, back-filling the tiers above a hit; an unknown user gets the default
//!   configuration; concurrent misses of one user make one database read.
//! * [`update_user_config`](UserConfigStorage::update_user_config): the database first, then
//!   every cache is invalidated and repopulated; versions keep a slow reader from putting an
//!   older configuration back.
//! * [`invalidate_user_config_cache`](UserConfigStorage::invalidate_user_config_cache),
//!   [`clear_memory_cache`](UserConfigStorage::clear_memory_cache),
//!   [`get_cache_stats`](UserConfigStorage::get_cache_stats) (the seed's JSON shape).
//!
//! [`UserConfig`] follows the original platform's schema; missing fields and sections get
//! defaults, and fields this version does not know survive a read-modify-write.
//!
//! Bad input (an empty, overlong or control-character user id; a configuration over the size
//! limit, 64 KiB by default; a schema range violation) is a typed [`Error`] before any I/O.

#![forbid(unsafe_code)]

/// The README's examples, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

mod builder;
mod changes;
mod config;
mod consistency;
mod database;
mod diff;
mod env;
mod error;
mod history;
mod stats;
mod storage;
mod watch;

/// The chain's key: a user id.
pub(crate) type Key = String;

pub use builder::UserConfigStorageBuilder;
pub use changes::{ChangeOp, ChangeReader, DEFAULT_CHANGE_LOG_ENTRIES, LoggedChange};
pub use config::{
    Extra, ImageGenerationConfig, MemoryConfig, ModelProfileConfig, NIL_PROFILE_ID,
    PreferencesConfig, RefinementConfig, SummarizationConfig, UserConfig, WebSearchConfig,
};
pub use consistency::{
    ConsistencyStats, DEFAULT_CONSISTENCY_CHECKS_PER_SECOND, DEFAULT_CONSISTENCY_GRACE,
    DEFAULT_CONSISTENCY_SAMPLE, nines,
};
pub use diff::json_patch;
pub use env::ENV_VARS;
pub use error::{Error, Result};
pub use history::{ConfigRevision, MAX_HISTORY_PAGE};
pub use stats::{CacheStats, DatabaseStats, MemoryCacheStats, RedisCacheStats};
#[cfg(feature = "cluster")]
pub use storage::REDIS_CLUSTER_NODES_VAR;
pub use storage::{
    Answer, DEFAULT_MAX_CONFIG_BYTES, DEFAULT_MEMORY_CAPACITY, DEFAULT_MEMORY_TTL,
    DEFAULT_REDIS_PREFIX, DEFAULT_REDIS_TTL, DEFAULT_SQLITE_PATH, FetchedConfig,
    MAX_MODIFY_ATTEMPTS, MAX_USER_ID_BYTES, UserConfigStorage, check_user_id, conflict_backoff,
};
/// The chain's types that appear in this crate's API (errors, versions, statistics, latency
/// summaries), and the core's helpers, so that a user of the facade needs no dependency of
/// its own on `tiercache-core`.
pub use tiercache_core::{
    ChainStats, ChainTierStats, Error as CacheError, FeedStats, LatencyHistogram, LatencySummary,
    TierStats, Version, util::error_chain,
};
pub use watch::{ConfigWatch, DEFAULT_MAX_WATCHED_USERS, WatchedConfig};
