//! A request rate per caller: the generic cell rate algorithm (GCRA), one atomic word per
//! caller, no lock and no timer task.
//!
//! Each caller has a "theoretical arrival time" (TAT): when its next request would be on
//! schedule at `per_second`. A request is let through while the TAT is no more than a burst
//! (`per_second` requests' worth of time) ahead of now, and moves it on by one interval.
//! tower's `RateLimit` is one limit for all callers; a service token's fair share needs one
//! per caller, and the callers are known in advance (the tokens file), so a fixed slot each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The rate of a fixed set of callers, each by its index.
pub(crate) struct Rate {
    /// Nanoseconds between two requests on schedule.
    interval: u64,
    /// How far ahead of now a caller's TAT may run: a burst of `per_second` requests.
    tolerance: u64,
    epoch: Instant,
    /// Each caller's TAT, in nanoseconds since `epoch`.
    tat: Vec<AtomicU64>,
}

impl Rate {
    /// `per_second` requests a second for each of `callers` (at least 1 a second).
    pub(crate) fn new(per_second: u32, callers: usize) -> Rate {
        let interval = 1_000_000_000 / u64::from(per_second.max(1));
        Rate {
            interval,
            tolerance: interval * u64::from(per_second.max(1) - 1),
            epoch: Instant::now(),
            tat: (0..callers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Lets one request of `caller` through now, or says how long until one would be.
    pub(crate) fn admit(&self, caller: usize) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.admit_at(caller, now)
    }

    fn admit_at(&self, caller: usize, now: u64) -> Result<(), Duration> {
        let slot = &self.tat[caller];
        let mut tat = slot.load(Ordering::Relaxed);
        loop {
            let from = tat.max(now);
            if from - now > self.tolerance {
                return Err(Duration::from_nanos(from - now - self.tolerance));
            }
            match slot.compare_exchange_weak(
                tat,
                from + self.interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_of_the_rate_then_one_per_interval() {
        let rate = Rate::new(10, 2);
        for i in 0..10 {
            assert!(rate.admit_at(0, 0).is_ok(), "request {i} of the burst");
        }
        let wait = rate.admit_at(0, 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one interval");
        // The other caller has its own share.
        assert!(rate.admit_at(1, 0).is_ok());
        // One interval later, one more; not two.
        assert!(rate.admit_at(0, SECOND / 10).is_ok());
        assert!(rate.admit_at(0, SECOND / 10).is_err());
        // After a quiet second, a whole burst again.
        for _ in 0..10 {
            assert!(rate.admit_at(0, 3 * SECOND).is_ok());
        }
        assert!(rate.admit_at(0, 3 * SECOND).is_err());
    }

    #[test]
    fn one_a_second_has_no_burst() {
        let rate = Rate::new(1, 1);
        assert!(rate.admit_at(0, 0).is_ok());
        assert_eq!(rate.admit_at(0, 0).unwrap_err(), Duration::from_secs(1));
        assert!(rate.admit_at(0, SECOND).is_ok());
    }
}
