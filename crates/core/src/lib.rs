//! The core of tiercache: the [`CacheTier`] and [`Source`] traits and the [`TieredCache`] chain.
//!
//! A chain reads through cache tiers top to bottom (memory, then Redis, say) down to an
//! authoritative source (a database), back-fills the tiers above a hit, coalesces concurrent
//! misses of a key into one source load, and writes to the source first, then invalidates and
//! repopulates every cache tier. Every entry carries the source's [`Version`]; tiers refuse to
//! replace a newer version with an older one and keep tombstones after invalidations, so a slow
//! reader can never put an old value back after an update.
//!
//! This crate depends on no tier. The tiers live in their own crates (`tiercache-memory`,
//! `tiercache-redis`, `tiercache-postgres`, ...), fakes and mocks in `tiercache-testkit`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use tiercache_core::{Origin, TieredCache};
//! use tiercache_testkit::{FakeSource, FakeTier};
//!
//! let memory = FakeTier::cache("memory");
//! let db = FakeSource::new("db");
//! db.put("alice".to_string(), "dark".to_string());
//!
//! let cache = TieredCache::builder()
//!     .tier(memory.clone())
//!     .source(db.clone())
//!     .build()?;
//!
//! let first = cache.fetch(&"alice".to_string()).await?;
//! assert_eq!(first.origin, Origin::Source);
//! let second = cache.fetch(&"alice".to_string()).await?;
//! assert_eq!(second.origin, Origin::Tier(0)); // back-filled
//!
//! cache.update(&"alice".to_string(), Arc::new("light".to_string())).await?;
//! assert_eq!(db.calls().write, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//! * `mock`: generates `MockCacheTier` and `MockSource` with mockall.

#![forbid(unsafe_code)]

mod backplane;
mod breaker;
mod chain;
mod clock;
mod entry;
mod error;
pub mod feed;
mod flight;
mod key;
mod latency;
mod source;
mod stats;
mod tier;
pub mod util;

/// The attribute the traits' implementations take (`#[tiercache_core::async_trait]`), so that a
/// crate writing its own tier or source needs no dependency of its own on `async-trait`.
pub use async_trait::async_trait;
pub use backplane::Backplane;
pub use breaker::{BreakerPolicy, DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD};
pub use chain::{
    DEFAULT_FLOOR_TTL, DEFAULT_MAX_PENDING_REPAIRS, DEFAULT_MAX_STALE, DEFAULT_NEGATIVE_TTL,
    DEFAULT_SOURCE_TIMEOUT, DEFAULT_TIER_TIMEOUT, DEFAULT_WRITE_SETTLE, Fetched, Miss,
    OBSERVER_BUFFER, Origin, TieredCache, TieredCacheBuilder, WeakTieredCache,
};
pub use clock::{Clock, ManualClock, TimeSource, Timestamp};
pub use entry::{Entry, Slot, Version};
pub use error::{BoxError, Error, Result};
pub use feed::{Applied, Change, ChangeFeed, Changes, FeedHealth, Scope, Via};
pub use key::StorageKey;
pub use latency::{LatencyHistogram, LatencySummary};
#[cfg(feature = "mock")]
pub use source::MockSource;
pub use source::{Revision, Source, Written};
pub use stats::{ChainStats, ChainTierStats, Counter, FeedStats, TierStats, hit_rate};
#[cfg(feature = "mock")]
pub use tier::MockCacheTier;
pub use tier::{CacheTier, Key, Peek, Value};
