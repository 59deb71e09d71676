//! What a run measured: the result `--json` writes and the reports read.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use userconfig::CacheStats;

use super::args::Mode;
use super::workload::Latencies;

/// The machine-readable result of one run.
#[derive(Debug, Serialize)]
pub(super) struct SimulationResult {
    pub(super) mode: Mode,
    /// The synthetic users are `sim-<run_id>-<rank>`.
    pub(super) run_id: String,
    /// How many of them were deleted from the database after the run (none with a temporary
    /// SQLite file, which is removed, or with `--keep-data`).
    pub(super) users_removed: Option<u64>,
    pub(super) users: usize,
    pub(super) instances: usize,
    pub(super) concurrency: usize,
    pub(super) requests: u64,
    pub(super) reads: u64,
    pub(super) writes: u64,
    pub(super) write_ratio: f64,
    pub(super) zipf_exponent: f64,
    pub(super) redis: bool,
    pub(super) database: String,
    pub(super) elapsed_seconds: f64,
    pub(super) requests_per_second: f64,
    /// Share of reads each tier answered.
    pub(super) answered_by: BTreeMap<&'static str, f64>,
    /// Latency percentiles per tier (and for writes), in microseconds.
    pub(super) latency_us: BTreeMap<&'static str, Percentiles>,
    pub(super) database_reads: u64,
    pub(super) database_reads_without_cache: u64,
    pub(super) database_reads_saved: f64,
    /// Database queries (reads and writes) per 1,000 requests; without a cache every request
    /// is one.
    pub(super) database_queries_per_1000_requests: f64,
    /// Reads that returned a version older than one another instance had already written
    /// (the update had returned before the read began).
    pub(super) stale_reads: u64,
    /// How long after the update each stale read happened, in microseconds.
    pub(super) staleness_us: Option<Percentiles>,
    /// What the instances' consistency verifiers found (a sample of the reads the caches
    /// answered, checked against the database's history a grace period later).
    pub(super) consistency: Consistency,
    /// Per interval: the share of reads each tier answered, and the stale reads.
    pub(super) timeline: Vec<Interval>,
    pub(super) stats: Vec<CacheStats>,
}

/// Every instance's consistency checks, summed.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Consistency {
    /// One cache hit in this many is checked.
    pub(super) sample_one_in: u32,
    /// The staleness forgiven, in milliseconds.
    pub(super) grace_ms: u64,
    pub(super) checked: u64,
    pub(super) inconsistent: u64,
    /// `-log10(inconsistent / checked)`, or with none inconsistent the lower bound
    /// `log10(checked)`.
    pub(super) nines: Option<f64>,
}

impl Consistency {
    pub(super) fn of(stats: &[CacheStats]) -> Self {
        let (checked, inconsistent) = stats.iter().fold((0, 0), |(c, i), s| {
            let v = &s.consistency;
            (
                c + v.checked_memory + v.checked_redis,
                i + v.inconsistent_memory + v.inconsistent_redis,
            )
        });
        let nines = userconfig::nines(checked, inconsistent);
        let first = stats.first().map(|s| &s.consistency);
        Consistency {
            sample_one_in: first.map_or(0, |c| c.sample_one_in),
            grace_ms: first.map_or(0, |c| c.grace_ms),
            checked,
            inconsistent,
            nines,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Percentiles {
    pub(super) count: usize,
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) max: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Interval {
    pub(super) end_ms: u64,
    pub(super) reads: u64,
    pub(super) memory: u64,
    pub(super) redis: u64,
    pub(super) database: u64,
    pub(super) stale_reads: u64,
}

pub(super) fn percentiles(l: &mut Latencies) -> Option<Percentiles> {
    let p = l.percentiles(&[50.0, 90.0, 99.0, 99.9, 100.0]);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    match p[..] {
        [p50, p90, p99, p999, max] => Some(Percentiles {
            count: l.len(),
            p50: us(p50),
            p90: us(p90),
            p99: us(p99),
            p999: us(p999),
            max: us(max),
        }),
        _ => None,
    }
}
