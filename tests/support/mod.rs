//! Shared set-up for the integration tests and benches: chains of fakes on a manual clock.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{CacheTier, ManualClock, TieredCache, TieredCacheBuilder};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier};

pub type Key = String;
pub type Val = String;

/// Memory TTL of the standard chain (the seed's 5 minutes).
pub const MEMORY_TTL: Duration = Duration::from_secs(300);
/// Second-tier TTL of the standard chain (the seed's 30 minutes for Redis).
pub const L2_TTL: Duration = Duration::from_secs(1800);

/// The seed's shape on fakes: a real memory tier, a fake "redis" tier and a fake source, all on
/// one manual clock.
pub struct Chain {
    pub manual: ManualClock,
    pub memory: Arc<MemoryTier<Key, Val>>,
    pub redis: FakeTier<Key, Val>,
    pub db: FakeSource<Key, Val>,
    pub cache: TieredCache<Key, Val>,
}

impl Chain {
    pub fn new() -> Self {
        Self::with(|b| b)
    }

    /// The standard chain, with the builder adjusted by `tune` before it is built.
    pub fn with(
        tune: impl FnOnce(TieredCacheBuilder<Key, Val>) -> TieredCacheBuilder<Key, Val>,
    ) -> Self {
        let manual = ManualClock::new();
        let memory = Arc::new(
            MemoryTier::builder()
                .ttl(MEMORY_TTL)
                .clock(manual.clock())
                .build()
                .expect("valid memory tier"),
        );
        let redis = FakeTier::cache("redis")
            .with_ttl(L2_TTL)
            .with_clock(manual.clock());
        let db = FakeSource::new("db");
        let builder = TieredCache::builder()
            .shared_tier(memory.clone(), Some(Duration::from_millis(200)))
            .tier_with_timeout(redis.clone(), Some(Duration::from_millis(200)))
            .source_with_timeout(db.clone(), Some(Duration::from_millis(500)))
            .clock(manual.clock());
        let cache = tune(builder).build().expect("valid chain");
        Chain {
            manual,
            memory,
            redis,
            db,
            cache,
        }
    }

    /// The version the memory tier holds for `key`, fresh or not.
    pub async fn memory_version(&self, key: &str) -> Option<u64> {
        self.memory
            .get_stale(&key.to_string(), Duration::MAX)
            .await
            .expect("memory never fails")
            .map(|e| e.version)
    }
}

pub fn key(k: &str) -> Key {
    k.to_string()
}

pub fn val(v: &str) -> Arc<Val> {
    Arc::new(v.to_string())
}
