//! The options of `userconfig simulate`, and their checks before anything connects.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::Failure;

/// Which design the instances follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// tiercache: single-flight, and the database's change feed (with Redis, the backplane as
    /// its fast path) keeping instances' memory coherent.
    Tiercache,
    /// The seed design: the same tiers without single-flight or cross-instance invalidation.
    Seed,
}

/// Options of `userconfig simulate`.
#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    pub(super) users: usize,
    /// Service instances in this process, each with its own memory tier.
    #[arg(long, default_value_t = 4)]
    pub(super) instances: usize,
    /// Concurrent tasks per instance.
    #[arg(long, default_value_t = 8)]
    pub(super) concurrency: usize,
    /// Requests in all, reads and writes.
    #[arg(long, default_value_t = 200_000)]
    pub(super) requests: u64,
    /// Share of requests that are updates.
    #[arg(long, default_value_t = 0.02)]
    pub(super) write_ratio: f64,
    /// Zipf exponent of user popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    pub(super) zipf: f64,
    /// Share of users that have a stored configuration before the run (the rest are new users,
    /// who get defaults).
    #[arg(long, default_value_t = 0.9)]
    pub(super) stored: f64,
    /// Memory tier capacity per instance.
    #[arg(long, default_value_t = userconfig::DEFAULT_MEMORY_CAPACITY)]
    pub(super) memory_capacity: usize,
    /// The design to run.
    #[arg(long, value_enum, default_value_t = Mode::Tiercache)]
    pub(super) mode: Mode,
    /// Run the seed design, then tiercache, on the same workload, and compare them.
    #[arg(long)]
    pub(super) compare: bool,
    /// Width of the timeline's intervals, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub(super) interval_ms: u64,
    /// Random seed (the run is reproducible up to the interleaving of tasks).
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
    /// Write the result as JSON to this file; `-` or no value: to standard output (the report
    /// then goes to standard error).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "-")]
    pub(super) json: Option<PathBuf>,
    /// Serve the live dashboard (and /stats, /metrics) of the simulated instances on this
    /// address while the simulation runs, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub(super) serve: Option<std::net::SocketAddr>,
    /// Keep the synthetic users (`sim-<run>-<n>`) in the database after the run; by default
    /// they are deleted.
    #[arg(long)]
    pub(super) keep_data: bool,
    /// Write the results (JSON) and the charts (SVG) into this directory.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub(super) no_progress: bool,
}

impl SimulateArgs {
    /// Whether the JSON result goes to standard output.
    pub(crate) fn json_to_stdout(&self) -> bool {
        self.json.as_deref() == Some(Path::new("-"))
    }
}

pub(super) fn check(args: &SimulateArgs) -> Result<(), Failure> {
    let problem = if args.users == 0 {
        "--users must be at least 1"
    } else if args.instances == 0 || args.concurrency == 0 {
        "--instances and --concurrency must be at least 1"
    } else if !(0.0..=1.0).contains(&args.write_ratio) || !(0.0..=1.0).contains(&args.stored) {
        "--write-ratio and --stored must be between 0 and 1"
    } else if !(args.zipf >= 0.0 && args.zipf.is_finite()) {
        "--zipf must be a finite number >= 0"
    } else if args.interval_ms == 0 {
        "--interval-ms must be at least 1"
    } else {
        return Ok(());
    };
    Err(Failure::usage(problem))
}
