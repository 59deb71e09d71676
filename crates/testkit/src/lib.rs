//! What tiercache's tests, and yours, need to test a chain or a tier without servers.
//!
//! * [`FakeTier`] and [`FakeSource`]: an in-memory cache tier and source that count their
//!   calls ([`FakeTier::calls`]) and take faults ([`FakeTier::faults`]).
//! * [`Faulty`]: wraps any tier (a real one too) with a [`FaultSwitch`]: [`Fault::Error`],
//!   [`Fault::Delay`], [`Fault::Hang`], or [`Fault::Hold`] at a [`Gate`] you open when the test is
//!   ready, for all operations or one ([`Op`]).
//! * [`BackplaneHub`]: an in-process backplane joining several chain instances, with random
//!   delivery delays and lost messages on demand.
//! * `FaultProxy` (feature `proxy`): a TCP proxy between a client and a real server whose mode
//!   switches between pass, latency, blackhole, reset and close-after-N-bytes.
//! * [`ManualClock`]: time that moves only when the test says, so TTL tests never sleep.
//! * [`env`](mod@env): where the test servers are (`REDIS_URL`, `DATABASE_URL`), unique names that keep
//!   parallel tests apart, and the message a test gives when a server is unreachable.
//! * [`MockCacheTier`] and [`MockSource`]: the mockall mocks of
//!   [`CacheTier`](tiercache_core::CacheTier) and [`Source`](tiercache_core::Source), for facts
//!   about call order ("after a memory hit, nothing below is called").
//!
//! # A property test against a model
//!
//! The fakes make chains cheap to build, so a proptest can build a fresh one per case and
//! compare it with a plain map:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tiercache_core::Result<()> {
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tiercache_core::TieredCache;
//! use tiercache_testkit::{FakeSource, FakeTier, Fault, ManualClock};
//!
//! let manual = ManualClock::new();
//! let l1 = FakeTier::cache("l1").with_peek().with_clock(manual.clock());
//! let l2 = FakeTier::cache("l2").with_clock(manual.clock());
//! let db = FakeSource::new("db");
//! let cache = TieredCache::builder()
//!     .tier(l1.clone())
//!     .tier(l2.clone())
//!     .source(db.clone())
//!     .clock(manual.clock())
//!     .build()?;
//!
//! let mut model: HashMap<u8, u64> = HashMap::new();
//! for (step, key) in [1u8, 2, 1, 3, 1].into_iter().enumerate() {
//!     if step % 2 == 0 {
//!         let v = cache.update(&key, Arc::new(step as u32)).await?;
//!         model.insert(key, v);
//!     }
//!     if step == 3 {
//!         l2.faults().set(Fault::Error); // a cache tier failing never fails a read
//!     }
//!     manual.advance(Duration::from_secs(100));
//!     let got = cache.fetch(&key).await?;
//!     assert_eq!(got.version, model.get(&key).copied().unwrap_or(0));
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

mod backplane;
mod capture;
#[cfg(feature = "contract")]
pub mod contract;
pub mod env;
mod fake;
mod fake_source;
mod fault;
#[cfg(feature = "postgres")]
pub mod postgres_env;
#[cfg(feature = "proxy")]
mod proxy;
#[cfg(feature = "redis")]
pub mod redis_env;
mod samples;

pub use backplane::{BackplaneHandle, BackplaneHub};
pub use capture::Captured;
pub use fake::{Calls, DEFAULT_FAKE_TTL, FakeTier};
pub use fake_source::FakeSource;
pub use fault::{Fault, FaultSwitch, Faulty, Gate, InjectedFault, Op};
#[cfg(feature = "proxy")]
pub use proxy::{FaultProxy, ProxyMode};
pub use samples::Samples;
pub use tiercache_core::{Clock, ManualClock, MockCacheTier, MockSource};
