//! Percentiles of measured times, for the benches' reports (each formats its own line).

use std::time::Duration;

/// Measured times, sorted once, read by nearest rank.
#[derive(Debug, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Sorts `samples`.
    ///
    /// # Panics
    /// If `samples` is empty.
    #[must_use]
    pub fn new(mut samples: Vec<Duration>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        Samples(samples)
    }

    /// The time at fraction `p` of the sorted samples (0.5 the median, 1.0 the longest),
    /// rounded to the nearest rank.
    #[must_use]
    pub fn at(&self, p: f64) -> Duration {
        let last = self.0.len() - 1;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = (last as f64 * p.clamp(0.0, 1.0)).round() as usize;
        self.0[rank.min(last)]
    }

    /// How many samples.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: [`new`](Self::new) refuses no samples.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s = Samples::new((1..=101).rev().map(Duration::from_millis).collect());
        assert_eq!(s.at(0.0), Duration::from_millis(1));
        assert_eq!(s.at(0.5), Duration::from_millis(51));
        assert_eq!(s.at(0.99), Duration::from_millis(100));
        assert_eq!(s.at(1.0), Duration::from_millis(101));
        assert_eq!(s.len(), 101);
        let two = Samples::new(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(
            two.at(0.5),
            Duration::from_millis(3),
            "0.5 rounds up to rank 1"
        );
        assert_eq!(two.at(0.4), Duration::from_millis(1));
    }
}
