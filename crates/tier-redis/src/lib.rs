//! The Redis tier of tiercache: shared by every service instance, 30-minute TTL by default.
//!
//! * **Connections**: the `redis` crate on tokio through a [`ConnectionManager`](redis::aio::ConnectionManager) that reconnects
//!   by itself. The first call starts the connection in a task of its own and waits for it at
//!   most one command time limit: a connection that takes longer (TLS, AUTH, a far server, a
//!   cluster's discovery) goes on in the background while calls fail fast with a transient
//!   [`Error::Unavailable`](tiercache_core::Error::Unavailable), instead of being cancelled with each caller and started again. A
//!   service starts while Redis is down; while it is unreachable each call fails within its
//!   time limit, and a chain's circuit breaker stops asking after three failures. `rediss://`
//!   URLs use TLS (the system's OpenSSL); `redis://user:password@host` authenticates (ACL
//!   users too). The password is never printed: `Debug` shows the address and user only.
//! * **Keys**: the prefix (default `tiercache:`) followed by the key, percent-encoded
//!   ([`keys`]): one-to-one, and free of `:` and glob characters. No command is ever built from
//!   a key as a pattern; [`clear`](tiercache_core::CacheTier::clear) scans for this tier's prefix only.
//! * **Values**: a versioned [`envelope`] (format, flags, source version, payload in
//!   MessagePack by default or JSON, lz4-compressed above 4 KiB by default), written by Lua
//!   scripts that refuse an older version and honour tombstones ([`scripts`]), with a TTL per
//!   entry (with jitter).
//! * **Reads**: one command, GET (or MGET for batches), as cheap for Redis as a raw GET; the
//!   envelope records the expiry, so an entry comes back with its remaining time to live (the
//!   chain caps back-fills with it). Bytes that do not decode are a miss: the key is deleted
//!   and counted in [`TierStats::corrupt`](tiercache_core::TierStats::corrupt).
//! * **Redis Cluster** (feature `cluster`): `RedisTierBuilder::cluster(seed nodes)` talks to a
//!   cluster instead of one server. Every script touches one key, so each runs on the key's
//!   master; batch reads (MGET) are split by slot by the tier and reassembled in order;
//!   `clear` scans every master. A [`RedisBackplane`] over [`RedisTier::backplane_clients`]
//!   listens and publishes on one node at a time (a cluster forwards every PUBLISH to all its
//!   nodes) and moves to another when that one fails. Tested against a three-master cluster of
//!   local `redis-server` processes (`tests/cluster.rs`, the same contract as one server), and
//!   through a master's death and its replica's election.
//!
//! ```no_run
//! # async fn demo() -> tiercache_core::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tiercache_core::{CacheTier, Entry};
//! use tiercache_redis::RedisTier;
//!
//! let redis = RedisTier::<String, String>::builder()
//!     .url("redis://127.0.0.1:6379/")
//!     .prefix("myapp:config:")
//!     .ttl(Duration::from_secs(1800))
//!     .build()?; // does not connect yet
//! redis.set(&"alice".into(), Entry::new(Arc::new("dark".into()), 3)).await?;
//! let entry = redis.get(&"alice".into()).await?.expect("stored");
//! assert_eq!(entry.version, 3);
//! # Ok(()) }
//! ```

//!
//! | file | job |
//! |---|---|
//! | `lib.rs` | these docs, the defaults, the re-exports |
//! | `tier.rs` | [`RedisTier`]: its state, reads and decoding, the [`CacheTier`](tiercache_core::CacheTier) implementation |
//! | `link.rs` | the connection's lifecycle: the connecting task, the redacted address |
//! | `error.rs` | redis errors mapped onto the core's, and the tier's own reasons |
//! | `codec.rs` | payloads in MessagePack or JSON, errors that never quote the data |
//! | `envelope.rs` | the versioned envelope around a payload |
//! | `scripts.rs` | the Lua scripts that refuse older versions |
//! | `keys.rs` | key encoding |
//! | `admin.rs`, `slots.rs` | cluster administration and routing by slot |
//! | `builder.rs` | [`RedisTierBuilder`]: settings, defaults, checks |
//! | `backplane/` | [`RedisBackplane`]: invalidations between instances over pub/sub (`mod.rs` the backplane and its settings, `wire.rs` the message format, `outbox.rs` the queue and its sender, `listener.rs` the subscription) |

#![forbid(unsafe_code)]

pub mod backplane;
pub mod envelope;
pub mod keys;
pub mod scripts;

mod admin;
mod builder;
mod codec;
mod error;
mod link;
#[cfg(feature = "cluster")]
mod slots;
mod tier;

use std::time::Duration;

pub use crate::backplane::{BackplaneStats, RedisBackplane};
pub use crate::builder::RedisTierBuilder;
pub use crate::keys::{decode_key, encode_key};
pub use crate::tier::RedisTier;

/// Default server.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "tiercache:";
/// Default time to live of an entry (the seed design's `REDIS_CACHE_TTL`, 30 minutes).
pub const DEFAULT_TTL: Duration = Duration::from_secs(1800);
/// Default jitter: TTLs are shortened by up to 10%, so entries filled together do not expire
/// together.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default time limit of one command's response.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default time limit of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default size above which payloads are compressed: a typical `UserConfig` (2 KB) is not, a
/// large one is.
pub const DEFAULT_COMPRESS_ABOVE: Option<usize> = Some(4096);
/// Default tier name.
pub const DEFAULT_NAME: &str = "redis";
/// Keys per `MGET` in `get_many`: a bounded command and reply, however many keys are asked.
const BATCH: usize = 1000;
