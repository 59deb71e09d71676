//! Time as the cache sees it: an injectable monotonic clock.
//!
//! Every expiry in the workspace is a [`Timestamp`] read from a [`Clock`]. Production code uses
//! [`Clock::system`]; tests use [`ManualClock`] and move time forward by hand, so that TTL tests
//! never sleep. All system clocks in a process share one origin, so timestamps from different
//! tiers compare.

use std::fmt;
use std::ops::{Add, Sub};
use std::sync::Arc;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std::time::Instant;

/// A point on a [`Clock`]'s monotonic time line, with nanosecond resolution.
///
/// Timestamps from one clock (or from any two system clocks of one process) compare; a
/// timestamp means nothing to another process, so tiers that store entries outside the process
/// (Redis) store the remaining time to live instead.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The clock's origin.
    pub const ZERO: Timestamp = Timestamp(0);

    /// The timestamp `since_origin` after the clock's origin.
    #[must_use]
    pub fn from_duration(since_origin: Duration) -> Self {
        Timestamp(u64::try_from(since_origin.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Time since the clock's origin.
    #[must_use]
    pub fn as_duration(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// Time from `earlier` to `self`, or zero if `earlier` is later.
    #[must_use]
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates at the end of time instead of overflowing.
    fn add(self, rhs: Duration) -> Timestamp {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(nanos))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;

    /// Saturates at the origin.
    fn sub(self, rhs: Duration) -> Timestamp {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_sub(nanos))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({:?})", self.as_duration())
    }
}

/// A custom time source for [`Clock::custom`].
pub trait TimeSource: Send + Sync + 'static {
    /// The current time. Must never go backwards.
    fn now(&self) -> Timestamp;
}

/// The clock every tier and the chain read the time from. Cheap to clone.
///
/// Defaults to [`Clock::system`].
#[derive(Clone, Default)]
pub struct Clock {
    inner: ClockInner,
}

#[derive(Clone, Default)]
enum ClockInner {
    #[default]
    System,
    Manual(Arc<AtomicU64>),
    Custom(Arc<dyn TimeSource>),
}

/// The system clock's current time.
///
/// On Linux: `CLOCK_MONOTONIC_COARSE`, read from the vDSO in a few nanoseconds, with the
/// resolution of the kernel tick (1 to 10 ms), ample for TTLs of seconds to hours and about a
/// tenth of the cost of `Instant::now()` on the memory-hit path.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
fn system_now() -> Timestamp {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    let nanos = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    Timestamp(nanos)
}

/// The system clock's current time: [`Instant`] since the first reading in this process.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
fn system_now() -> Timestamp {
    static SYSTEM_ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = SYSTEM_ORIGIN.get_or_init(Instant::now);
    Timestamp::from_duration(origin.elapsed())
}

impl Clock {
    /// The machine's monotonic clock: on Linux `CLOCK_MONOTONIC_COARSE` (millisecond
    /// resolution, a few nanoseconds to read), elsewhere [`std::time::Instant`].
    #[must_use]
    pub fn system() -> Self {
        Clock {
            inner: ClockInner::System,
        }
    }

    /// A clock driven by a [`TimeSource`] of your own.
    #[must_use]
    pub fn custom(source: Arc<dyn TimeSource>) -> Self {
        Clock {
            inner: ClockInner::Custom(source),
        }
    }

    /// The current time.
    #[inline]
    #[must_use]
    pub fn now(&self) -> Timestamp {
        match &self.inner {
            ClockInner::System => system_now(),
            ClockInner::Manual(nanos) => Timestamp(nanos.load(Ordering::Acquire)),
            ClockInner::Custom(source) => source.now(),
        }
    }

    /// Whether this is a [`ManualClock`]'s clock.
    #[must_use]
    pub fn is_manual(&self) -> bool {
        matches!(self.inner, ClockInner::Manual(_))
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            ClockInner::System => "system",
            ClockInner::Manual(_) => "manual",
            ClockInner::Custom(_) => "custom",
        };
        f.debug_struct("Clock")
            .field("kind", &kind)
            .field("now", &self.now())
            .finish()
    }
}

/// A clock that moves only when told to: give [`ManualClock::clock`] to every tier and to the
/// chain, then call [`ManualClock::advance`].
///
/// ```
/// use std::time::Duration;
/// use tiercache_core::ManualClock;
///
/// let manual = ManualClock::new();
/// let clock = manual.clock();
/// let start = clock.now();
/// manual.advance(Duration::from_secs(300));
/// assert_eq!(clock.now().saturating_since(start), Duration::from_secs(300));
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at one hour past its origin (so that subtracting a few minutes from
    /// "now" in a test does not saturate at zero).
    #[must_use]
    pub fn new() -> Self {
        let start = Timestamp::from_duration(Duration::from_secs(3600));
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// A [`Clock`] that reads this manual clock.
    #[must_use]
    pub fn clock(&self) -> Clock {
        Clock {
            inner: ClockInner::Manual(Arc::clone(&self.nanos)),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::AcqRel);
    }

    /// The current time.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn system_clock_is_monotonic_and_advances() {
        let clock = Clock::system();
        let start = clock.now();
        let mut last = start;
        for _ in 0..10_000 {
            let now = clock.now();
            assert!(now >= last, "went back");
            last = now;
        }
        std::thread::sleep(Duration::from_millis(30));
        // The coarse clock ticks every few milliseconds: 30 ms of sleep shows as 20 at least.
        assert!(
            clock.now().saturating_since(start) >= Duration::from_millis(20),
            "did not advance"
        );
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let manual = ManualClock::new();
        let clock = manual.clock();
        let a = clock.now();
        assert_eq!(clock.now(), a);
        manual.advance(Duration::from_millis(5));
        assert_eq!(clock.now().saturating_since(a), Duration::from_millis(5));
        assert!(clock.is_manual());
    }

    proptest! {
        #[test]
        fn timestamp_arithmetic_saturates(a in any::<u64>(), d in any::<u64>()) {
            let t = Timestamp(a);
            let later = t + Duration::from_nanos(d);
            prop_assert!(later >= t);
            prop_assert_eq!(later.0, a.saturating_add(d));
            let earlier = t - Duration::from_nanos(d);
            prop_assert!(earlier <= t);
            prop_assert_eq!(earlier.0, a.saturating_sub(d));
            prop_assert_eq!(later.saturating_since(t), Duration::from_nanos(later.0 - a));
            prop_assert_eq!(t.saturating_since(later), Duration::ZERO);
        }
    }
}
