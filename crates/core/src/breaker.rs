//! A circuit breaker per level of the chain: after a run of transient failures the level is
//! skipped for a cool-down, then one call probes it; a success closes the breaker.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock: real time in production, and paused, virtual time in tests that pause it, so
// that a seeded race replays the same way every time.
use tokio::time::Instant;

use serde::{Deserialize, Serialize};

use crate::stats::Counter;

/// Default consecutive transient failures that open a breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 3;
/// Default time an open breaker skips its tier before letting one call probe it.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_millis(250);

/// When a level's breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerPolicy {
    /// Consecutive transient failures (timeouts, unreachable) that open the breaker; 0 never
    /// opens it.
    pub threshold: u32,
    /// How long an open breaker skips the tier before one call probes it.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            threshold: DEFAULT_BREAKER_THRESHOLD,
            cooldown: DEFAULT_BREAKER_COOLDOWN,
        }
    }
}

impl BreakerPolicy {
    /// A breaker that never opens.
    #[must_use]
    pub fn never() -> Self {
        BreakerPolicy {
            threshold: 0,
            cooldown: Duration::ZERO,
        }
    }
}

/// What the breaker lets a call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Closed: go ahead.
    Go,
    /// Open, cool-down over: this call probes the tier.
    Probe,
    /// Open: skip the tier.
    Skip,
}

/// A call's leave to reach the tier. Hand its outcome to [`Permit::record`]. A probe dropped
/// before it records (its caller gave up at an `.await`, or the tier panicked) gives the probe
/// back, so that the next call after the cool-down probes again: without that, one cancelled
/// probe would keep the breaker open until restart.
#[must_use = "record the call's outcome"]
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    access: Access,
}

impl Permit<'_> {
    pub(crate) fn access(&self) -> Access {
        self.access
    }

    /// Records the call's outcome: `healthy` is a success or a failure that says nothing about
    /// the tier's reachability (corrupt data, an unsupported operation).
    pub(crate) fn record(mut self, healthy: bool) {
        self.breaker.record(self.access, healthy);
        // Recorded: nothing left for drop to give back.
        self.access = Access::Go;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.access == Access::Probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

/// The state is a few atomics, so that a closed breaker costs one load per call.
pub(crate) struct Breaker {
    policy: BreakerPolicy,
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which the breaker skips calls.
    open_until: AtomicU64,
    probing: AtomicBool,
    epoch: Instant,
    pub(crate) opened: Counter,
}

impl Breaker {
    pub(crate) fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
            opened: Counter::default(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn tripped(&self) -> bool {
        self.policy.threshold > 0 && self.failures.load(Ordering::Acquire) >= self.policy.threshold
    }

    /// Whether the breaker is open (skipping or probing).
    pub(crate) fn is_open(&self) -> bool {
        self.tripped()
    }

    pub(crate) fn permit(&self) -> Permit<'_> {
        Permit {
            breaker: self,
            access: self.access(),
        }
    }

    fn access(&self) -> Access {
        if !self.tripped() {
            return Access::Go;
        }
        if self.now() < self.open_until.load(Ordering::Acquire) {
            return Access::Skip;
        }
        // One probe at a time; the others keep skipping until it answers.
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Access::Probe,
            Err(_) => Access::Skip,
        }
    }

    fn record(&self, permit: Access, healthy: bool) {
        if healthy {
            let was = self.failures.swap(0, Ordering::AcqRel);
            if self.policy.threshold > 0 && was >= self.policy.threshold {
                tracing::info!("tier answers again; breaker closed");
            }
        } else {
            let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if self.policy.threshold > 0
                && (failures == self.policy.threshold || permit == Access::Probe)
            {
                let until =
                    self.now() + u64::try_from(self.policy.cooldown.as_nanos()).unwrap_or(0);
                self.open_until.store(until, Ordering::Release);
                if failures == self.policy.threshold {
                    self.opened.incr();
                    tracing::warn!(failures, "tier keeps failing; breaker opened");
                }
            }
        }
        if permit == Access::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let b = Breaker::new(BreakerPolicy {
            threshold: 2,
            cooldown: Duration::from_millis(30),
        });
        let access = |b: &Breaker| {
            let permit = b.permit();
            let access = permit.access();
            std::mem::forget(permit);
            access
        };
        assert_eq!(access(&b), Access::Go);
        b.permit().record(false);
        assert_eq!(access(&b), Access::Go);
        b.permit().record(false);
        assert!(b.is_open());
        assert_eq!(access(&b), Access::Skip);
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.permit();
        assert_eq!(probe.access(), Access::Probe);
        assert_eq!(access(&b), Access::Skip, "one probe at a time");
        // A failed probe opens it for another cool-down.
        probe.record(false);
        assert_eq!(access(&b), Access::Skip);
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.permit();
        assert_eq!(probe.access(), Access::Probe);
        probe.record(true);
        assert!(!b.is_open());
        assert_eq!(access(&b), Access::Go);
        assert_eq!(b.opened.get(), 1);
    }

    #[test]
    fn a_dropped_probe_gives_the_probe_back() {
        let b = Breaker::new(BreakerPolicy {
            threshold: 1,
            cooldown: Duration::from_millis(10),
        });
        b.permit().record(false);
        std::thread::sleep(Duration::from_millis(20));
        let probe = b.permit();
        assert_eq!(probe.access(), Access::Probe);
        drop(probe);
        assert!(b.is_open(), "a dropped probe says nothing of the tier");
        assert_eq!(b.permit().access(), Access::Probe, "the next call probes");
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_comes_at_exactly_the_end_of_the_cooldown() {
        let b = Breaker::new(BreakerPolicy {
            threshold: 1,
            cooldown: Duration::from_millis(100),
        });
        b.permit().record(false);
        tokio::time::advance(Duration::from_millis(100) - Duration::from_nanos(1)).await;
        assert_eq!(b.permit().access(), Access::Skip, "a nanosecond early");
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert_eq!(b.permit().access(), Access::Probe);
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let b = Breaker::new(BreakerPolicy::never());
        for _ in 0..10 {
            b.permit().record(false);
        }
        assert_eq!(b.permit().access(), Access::Go);
    }
}
