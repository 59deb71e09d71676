//! The simulated workload: who asks, how often, and what is measured.

use std::time::Duration;

/// Draws user ranks `0..n` with Zipf popularity: rank `k` is chosen with probability
/// proportional to `1 / (k + 1)^exponent`.
#[derive(Debug, Clone)]
pub(crate) struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// A distribution over `n >= 1` ranks with the given exponent (`>= 0`; 0 is uniform).
    pub(crate) fn new(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / (k as f64).powf(exponent);
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.into_iter().map(|c| c / total).collect();
        Zipf { cumulative }
    }

    /// A rank, by inverting the cumulative distribution at a uniform draw.
    pub(crate) fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cumulative
            .partition_point(|&c| c < u)
            .min(self.cumulative.len() - 1)
    }
}

/// Latencies of one kind of answer, in nanoseconds.
#[derive(Debug, Default, Clone)]
pub(crate) struct Latencies {
    nanos: Vec<u64>,
}

impl Latencies {
    pub(crate) fn record(&mut self, took: Duration) {
        self.nanos
            .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn merge(&mut self, other: Latencies) {
        self.nanos.extend(other.nanos);
    }

    pub(crate) fn len(&self) -> usize {
        self.nanos.len()
    }

    /// The percentiles `ps` (each in `[0, 100]`), in the order given; empty if no samples.
    pub(crate) fn percentiles(&mut self, ps: &[f64]) -> Vec<Duration> {
        if self.nanos.is_empty() {
            return Vec::new();
        }
        self.nanos.sort_unstable();
        let last = self.nanos.len() - 1;
        ps.iter()
            .map(|p| {
                let rank = ((p / 100.0) * last as f64).round() as usize;
                Duration::from_nanos(self.nanos[rank.min(last)])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_ranks_and_covers_all() {
        let z = Zipf::new(100, 1.0);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > counts[9] && counts[9] > counts[99]);
        // Rank 1 is about twice as popular as rank 2 for exponent 1.
        let ratio = f64::from(counts[0]) / f64::from(counts[1]);
        assert!((1.7..2.3).contains(&ratio), "{ratio}");
        let uniform = Zipf::new(10, 0.0);
        let mut seen = [false; 10];
        for _ in 0..1_000 {
            seen[uniform.sample(&mut rng)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut l = Latencies::default();
        for n in 1..=100 {
            l.record(Duration::from_nanos(n));
        }
        let p = l.percentiles(&[0.0, 50.0, 99.0, 100.0]);
        assert_eq!(
            p,
            [1, 51, 99, 100].map(Duration::from_nanos).to_vec(),
            "{p:?}"
        );
        assert!(Latencies::default().percentiles(&[50.0]).is_empty());
    }
}
