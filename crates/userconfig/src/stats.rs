//! What [`UserConfigStorage::get_cache_stats`](crate::UserConfigStorage::get_cache_stats)
//! returns: the seed's JSON shape, plus the chain's view.

use serde::{Deserialize, Serialize};
use tiercache_core::{ChainStats, TierStats};
use tiercache_redis::BackplaneStats;

/// What [`UserConfigStorage::get_cache_stats`](crate::UserConfigStorage::get_cache_stats) returns: the seed's shape, plus the chain's view.
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
    /// The consistency checks of a share of the reads the caches answered.
    pub consistency: crate::ConsistencyStats,
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
