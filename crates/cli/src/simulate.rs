//! `userconfig simulate`: several service instances in one process, sharing Redis and the
//! database, under a Zipf-popular read/write workload; what each tier answered, how fast, how
//! many database queries the cache saved, and how long other instances served a replaced
//! version (staleness).
//!
//! `--compare` runs the same workload twice: as the seed design had it (no single-flight, no
//! cross-instance invalidation) and as tiercache does, and `--out DIR` writes both results as
//! JSON and draws the report's charts as SVG.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use userconfig::{Answer, CacheStats, UserConfig, UserConfigStorage};

use crate::plot;
use crate::serve::{self, window::Window};
use crate::workload::{Latencies, Zipf};
use crate::{Connection, Failure};

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
    users: usize,
    /// Service instances in this process, each with its own memory tier.
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// Concurrent tasks per instance.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in all, reads and writes.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Share of requests that are updates.
    #[arg(long, default_value_t = 0.02)]
    write_ratio: f64,
    /// Zipf exponent of user popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Share of users that have a stored configuration before the run (the rest are new users,
    /// who get defaults).
    #[arg(long, default_value_t = 0.9)]
    stored: f64,
    /// Memory tier capacity per instance.
    #[arg(long, default_value_t = userconfig::DEFAULT_MEMORY_CAPACITY)]
    memory_capacity: usize,
    /// The design to run.
    #[arg(long, value_enum, default_value_t = Mode::Tiercache)]
    mode: Mode,
    /// Run the seed design, then tiercache, on the same workload, and compare them.
    #[arg(long)]
    compare: bool,
    /// Width of the timeline's intervals, in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Random seed (the run is reproducible up to the interleaving of tasks).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the result as JSON to this file; `-` or no value: to standard output (the report
    /// then goes to standard error).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Serve the live dashboard (and /stats, /metrics) of the simulated instances on this
    /// address while the simulation runs, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    serve: Option<std::net::SocketAddr>,
    /// Keep the synthetic users (`sim-<run>-<n>`) in the database after the run; by default
    /// they are deleted.
    #[arg(long)]
    keep_data: bool,
    /// Write the results (JSON) and the charts (SVG) into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// `println!`, or `eprintln!` when standard output carries the JSON result.
macro_rules! say {
    ($stderr:expr) => {
        if $stderr { eprintln!() } else { println!() }
    };
    ($stderr:expr, $($arg:tt)*) => {
        if $stderr { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

impl SimulateArgs {
    /// Whether the JSON result goes to standard output.
    pub(crate) fn json_to_stdout(&self) -> bool {
        self.json.as_deref() == Some(Path::new("-"))
    }
}

/// The machine-readable result of one run.
#[derive(Debug, Serialize)]
struct SimulationResult {
    mode: Mode,
    /// The synthetic users are `sim-<run_id>-<rank>`.
    run_id: String,
    /// How many of them were deleted from the database after the run (none with a temporary
    /// SQLite file, which is removed, or with `--keep-data`).
    users_removed: Option<u64>,
    users: usize,
    instances: usize,
    concurrency: usize,
    requests: u64,
    reads: u64,
    writes: u64,
    write_ratio: f64,
    zipf_exponent: f64,
    redis: bool,
    database: String,
    elapsed_seconds: f64,
    requests_per_second: f64,
    /// Share of reads each tier answered.
    answered_by: BTreeMap<&'static str, f64>,
    /// Latency percentiles per tier (and for writes), in microseconds.
    latency_us: BTreeMap<&'static str, Percentiles>,
    database_reads: u64,
    database_reads_without_cache: u64,
    database_reads_saved: f64,
    /// Database queries (reads and writes) per 1,000 requests; without a cache every request
    /// is one.
    database_queries_per_1000_requests: f64,
    /// Reads that returned a version older than one another instance had already written
    /// (the update had returned before the read began).
    stale_reads: u64,
    /// How long after the update each stale read happened, in microseconds.
    staleness_us: Option<Percentiles>,
    /// Per interval: the share of reads each tier answered, and the stale reads.
    timeline: Vec<Interval>,
    stats: Vec<CacheStats>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Interval {
    end_ms: u64,
    reads: u64,
    memory: u64,
    redis: u64,
    database: u64,
    stale_reads: u64,
}

/// The latest version each user was updated to, and when the update returned, in shards so
/// that 32 tasks do not queue on one lock.
struct Latest {
    shards: Vec<Mutex<HashMap<String, (u64, Instant)>>>,
    hasher: RandomState,
}

impl Latest {
    fn new() -> Self {
        Latest {
            shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        let i = (self.hasher.hash_one(user) % self.shards.len() as u64) as usize;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn updated(&self, user: &str, version: u64, at: Instant) {
        let mut shard = self.shard(user);
        let slot = shard.entry(user.to_owned()).or_insert((version, at));
        if version >= slot.0 {
            *slot = (version, at);
        }
    }

    /// How stale a read of `version` that began at `began` and ended at `ended` was, if it
    /// returned less than an update that had returned before it began.
    fn staleness(
        &self,
        user: &str,
        version: u64,
        began: Instant,
        ended: Instant,
    ) -> Option<Duration> {
        let shard = self.shard(user);
        match shard.get(user) {
            Some(&(latest, at)) if latest > version && at <= began => Some(ended - at),
            _ => None,
        }
    }
}

#[derive(Default)]
struct TaskOutcome {
    by_tier: BTreeMap<&'static str, Latencies>,
    writes: Latencies,
    staleness: Latencies,
    timeline: Vec<Interval>,
}

pub(crate) async fn run(args: SimulateArgs, connection: Connection) -> Result<(), Failure> {
    check(&args)?;
    let modes = if args.compare {
        vec![Mode::Seed, Mode::Tiercache]
    } else {
        vec![args.mode]
    };
    let mut results = Vec::new();
    for mode in modes {
        let result = run_mode(&args, &connection, mode).await?;
        print_report(&result, args.json_to_stdout());
        results.push(result);
    }
    if results.len() == 2 {
        print_comparison(&results[0], &results[1], args.json_to_stdout());
    }
    if let Some(path) = &args.json {
        let text = if results.len() == 1 {
            serde_json::to_string_pretty(&results[0])
        } else {
            serde_json::to_string_pretty(&results)
        }
        .expect("results serialize");
        if args.json_to_stdout() {
            println!("{text}");
        } else {
            std::fs::write(path, text)
                .map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))?;
            eprintln!("result written to {}", path.display());
        }
    }
    if let Some(dir) = &args.out {
        write_report(dir, &results)?;
        eprintln!("results and charts written to {}", dir.display());
    }
    Ok(())
}

async fn run_mode(
    args: &SimulateArgs,
    connection: &Connection,
    mode: Mode,
) -> Result<SimulationResult, Failure> {
    let run_id = format!(
        "{:x}",
        args.seed ^ u64::from(std::process::id()) ^ (mode as u64) << 40
    );
    let temp_db = connection
        .database_url
        .is_none()
        .then(|| std::env::temp_dir().join(format!("userconfig-simulate-{run_id}.sqlite3")));
    let mut storages = Vec::with_capacity(args.instances);
    for i in 0..args.instances {
        let mut builder = connection
            .builder()?
            .memory_capacity(args.memory_capacity)
            // Simulated users live under their own Redis prefix, apart from real ones.
            .redis_prefix(format!("userconfig-sim:{run_id}:"))
            .single_flight(mode == Mode::Tiercache)
            // The database's change feed keeps the instances' memory coherent; the backplane
            // (with Redis) is its fast path.
            .follow_changes(mode == Mode::Tiercache)
            .backplane(mode == Mode::Tiercache);
        builder = match (i, &temp_db) {
            // The database URL is the connection's (`builder` has it).
            (0, None) => builder,
            (0, Some(path)) => builder.sqlite_path(path.clone()),
            _ => builder.share_database(&storages[0]),
        };
        storages.push(builder.build().await?);
    }
    let window = Arc::new(Window::default());
    let server = match args.serve {
        Some(addr) => {
            // Open (its routes reach the database's real users too): a loopback address only.
            let access = serve::open_on(addr, false)?;
            let running = serve::start(
                addr,
                storages.clone(),
                window.clone(),
                1024 * 1024,
                access,
                serve::limits::Limits::default(),
            )
            .await?;
            eprintln!("dashboard: http://{}/", running.addr);
            Some(running)
        }
        None => None,
    };
    let result = drive(args, mode, &storages, &run_id, &window).await;
    if let Some(server) = server {
        server.stop().await?;
    }
    let result = match result {
        Ok(mut result) if temp_db.is_none() && !args.keep_data => {
            result.users_removed = Some(remove_users(args, &storages[0], &run_id).await?);
            Ok(result)
        }
        other => other,
    };
    if let Some(path) = &temp_db {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Most retries of one user's store while the users are stored before the run (100 ms apart:
/// long enough for an open breaker's cool-down to pass).
const SEED_RETRIES: u32 = 100;

/// Deletes the run's synthetic users from the database (a temporary SQLite file is simply
/// removed).
async fn remove_users(
    args: &SimulateArgs,
    storage: &UserConfigStorage,
    run_id: &str,
) -> Result<u64, Failure> {
    let bar = progress(args.users as u64, "removing users", args.no_progress);
    let workers = 8.min(args.users);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (storage, run_id, bar) = (storage.clone(), run_id.to_owned(), bar.clone());
        let users = args.users;
        tasks.push(tokio::spawn(async move {
            let mut removed = 0u64;
            for rank in (w..users).step_by(workers) {
                if storage.delete_user_config(&user_id(&run_id, rank)).await? > 0 {
                    removed += 1;
                }
                bar.inc(1);
            }
            Ok::<u64, userconfig::Error>(removed)
        }));
    }
    let mut removed = 0;
    for t in tasks {
        removed += t.await.expect("removal task panicked")?;
    }
    bar.finish_and_clear();
    eprintln!("removed the run's {removed} synthetic users (--keep-data keeps them)");
    Ok(removed)
}

fn check(args: &SimulateArgs) -> Result<(), Failure> {
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

fn user_id(run_id: &str, rank: usize) -> String {
    format!("sim-{run_id}-{rank}")
}

fn config_for(user: &str, step: u64) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = if step.is_multiple_of(2) {
        "dark"
    } else {
        "light"
    }
    .to_owned();
    c.preferences.font_size = 12 + (step % 6) as i64;
    c.memory.limit = 3 + (step % 5) as i64;
    c
}

fn progress(len: u64, message: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

fn percentiles(l: &mut Latencies) -> Option<Percentiles> {
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

async fn drive(
    args: &SimulateArgs,
    mode: Mode,
    storages: &[UserConfigStorage],
    run_id: &str,
    window: &Arc<Window>,
) -> Result<SimulationResult, Failure> {
    // Store the configurations of the `stored` share of users, through instance 0.
    let stored = (args.users as f64 * args.stored).round() as usize;
    let bar = progress(stored as u64, "storing", args.no_progress);
    let seeders = 8.min(stored.max(1));
    let retried = Arc::new(AtomicU64::new(0));
    let mut seeding = Vec::new();
    for s in 0..seeders {
        let storage = storages[0].clone();
        let retried = retried.clone();
        let run_id = run_id.to_owned();
        let bar = bar.clone();
        seeding.push(tokio::spawn(async move {
            for rank in (s..stored).step_by(seeders) {
                let user = user_id(&run_id, rank);
                // A transient failure (a busy pool at start-up, say) is retried: storing
                // the users is set-up, not what is measured. Each retry is reported.
                let mut attempt = 0;
                loop {
                    match storage
                        .update_user_config(&user, &config_for(&user, 0))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_transient() && attempt < SEED_RETRIES => {
                            attempt += 1;
                            retried.fetch_add(1, Ordering::Relaxed);
                            if attempt == 1 {
                                tracing::warn!(error = %crate::explain(&e), "storing a user failed; retrying");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                bar.inc(1);
            }
            Ok::<(), userconfig::Error>(())
        }));
    }
    for s in seeding {
        s.await.expect("seeding task panicked")?;
    }
    bar.finish_and_clear();
    let retried = retried.load(Ordering::Relaxed);
    if retried > 0 {
        eprintln!("storing the users met {retried} transient failures, each retried");
    }
    // Start from cold caches, as a fresh deployment would, and count only the run.
    for storage in storages {
        storage.clear_memory_cache().await;
    }
    let before: u64 = storages
        .iter()
        .map(|s| s.get_cache_stats().chain.source_loads)
        .sum();

    let zipf = Arc::new(Zipf::new(args.users, args.zipf));
    let latest = Arc::new(Latest::new());
    let done = Arc::new(AtomicU64::new(0));
    let tasks_total = (args.instances * args.concurrency) as u64;
    let label = match mode {
        Mode::Tiercache => "tiercache",
        Mode::Seed => "seed",
    };
    let bar = progress(args.requests, label, args.no_progress);
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let interval = Duration::from_millis(args.interval_ms);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, storage) in storages.iter().enumerate() {
        for t in 0..args.concurrency {
            let task_index = (i * args.concurrency + t) as u64;
            let share =
                args.requests / tasks_total + u64::from(task_index < args.requests % tasks_total);
            let storage = storage.clone();
            let (zipf, done, latest) = (zipf.clone(), done.clone(), latest.clone());
            let window = window.clone();
            let run_id = run_id.to_owned();
            let write_ratio = args.write_ratio;
            let mut rng = fastrand::Rng::with_seed(args.seed.wrapping_add(task_index));
            tasks.push(tokio::spawn(async move {
                let mut outcome = TaskOutcome::default();
                for step in 0..share {
                    let user = user_id(&run_id, zipf.sample(&mut rng));
                    let began = Instant::now();
                    let slot =
                        (began.duration_since(started).as_nanos() / interval.as_nanos()) as usize;
                    if outcome.timeline.len() <= slot {
                        outcome.timeline.resize(slot + 1, Interval::default());
                    }
                    if rng.f64() < write_ratio {
                        let version = storage
                            .update_user_config(&user, &config_for(&user, step + 1))
                            .await?;
                        let now = Instant::now();
                        latest.updated(&user, version, now);
                        outcome.writes.record(now - began);
                    } else {
                        let fetched = storage.fetch_user_config(&user).await?;
                        let ended = Instant::now();
                        window.record(fetched.answered_by, ended - began);
                        outcome
                            .by_tier
                            .entry(fetched.answered_by.as_str())
                            .or_default()
                            .record(ended - began);
                        let cell = &mut outcome.timeline[slot];
                        cell.reads += 1;
                        match fetched.answered_by {
                            Answer::Memory => cell.memory += 1,
                            Answer::Redis => cell.redis += 1,
                            _ => cell.database += 1,
                        }
                        if let Some(late) = latest.staleness(&user, fetched.version, began, ended) {
                            cell.stale_reads += 1;
                            window.record_lag(late);
                            outcome.staleness.record(late);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<TaskOutcome, userconfig::Error>(outcome)
            }));
        }
    }
    let mut by_tier: BTreeMap<&'static str, Latencies> = BTreeMap::new();
    let mut writes = Latencies::default();
    let mut staleness = Latencies::default();
    let mut timeline: Vec<Interval> = Vec::new();
    for task in tasks {
        let outcome = task.await.expect("workload task panicked")?;
        for (tier, l) in outcome.by_tier {
            by_tier.entry(tier).or_default().merge(l);
        }
        writes.merge(outcome.writes);
        staleness.merge(outcome.staleness);
        if timeline.len() < outcome.timeline.len() {
            timeline.resize(outcome.timeline.len(), Interval::default());
        }
        for (mine, theirs) in timeline.iter_mut().zip(outcome.timeline) {
            mine.reads += theirs.reads;
            mine.memory += theirs.memory;
            mine.redis += theirs.redis;
            mine.database += theirs.database;
            mine.stale_reads += theirs.stale_reads;
        }
    }
    for (i, cell) in timeline.iter_mut().enumerate() {
        cell.end_ms = (i as u64 + 1) * args.interval_ms;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();

    let stats: Vec<CacheStats> = storages.iter().map(|s| s.get_cache_stats()).collect();
    let after: u64 = stats.iter().map(|s| s.chain.source_loads).sum();
    let reads: u64 = by_tier.values().map(|l| l.len() as u64).sum();
    let database_reads = after - before;
    let mut answered_by = BTreeMap::new();
    for tier in [
        Answer::Memory,
        Answer::Redis,
        Answer::Database,
        Answer::Stale,
    ] {
        let n = by_tier.get(tier.as_str()).map_or(0, Latencies::len);
        if n > 0 || tier != Answer::Stale {
            answered_by.insert(tier.as_str(), n as f64 / reads.max(1) as f64);
        }
    }
    let mut latency_us = BTreeMap::new();
    for (tier, l) in &mut by_tier {
        if let Some(p) = percentiles(l) {
            latency_us.insert(*tier, p);
        }
    }
    if let Some(p) = percentiles(&mut writes) {
        latency_us.insert("writes", p);
    }
    let requests = reads + writes.len() as u64;
    Ok(SimulationResult {
        mode,
        run_id: run_id.to_owned(),
        users_removed: None,
        users: args.users,
        instances: args.instances,
        concurrency: args.concurrency,
        requests,
        reads,
        writes: writes.len() as u64,
        write_ratio: args.write_ratio,
        zipf_exponent: args.zipf,
        redis: stats[0].redis_cache.enabled,
        database: stats[0].database.backend.clone(),
        elapsed_seconds: elapsed.as_secs_f64(),
        requests_per_second: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        answered_by,
        latency_us,
        database_reads,
        database_reads_without_cache: reads,
        database_reads_saved: 1.0 - database_reads as f64 / reads.max(1) as f64,
        database_queries_per_1000_requests: (database_reads + writes.len() as u64) as f64 * 1000.0
            / requests.max(1) as f64,
        stale_reads: staleness.len() as u64,
        staleness_us: percentiles(&mut staleness),
        timeline,
        stats,
    })
}

fn print_report(r: &SimulationResult, stderr: bool) {
    say!(
        stderr,
        "[{:?}] {} instances x {} tasks, {} users (Zipf {}), {} requests ({} writes) in {:.2} s: {:.0} requests/s",
        r.mode,
        r.instances,
        r.concurrency,
        r.users,
        r.zipf_exponent,
        r.requests,
        r.writes,
        r.elapsed_seconds,
        r.requests_per_second
    );
    say!(
        stderr,
        "tiers: memory{} -> {}",
        if r.redis { " -> redis" } else { "" },
        r.database
    );
    say!(stderr);
    say!(
        stderr,
        "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "answered",
        "share",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us"
    );
    for (tier, p) in &r.latency_us {
        let share = match *tier {
            "writes" => r.writes as f64 / r.requests.max(1) as f64,
            t => r.answered_by.get(t).copied().unwrap_or(0.0),
        };
        say!(
            stderr,
            "{:<10} {:>7.1}% {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            tier,
            share * 100.0,
            p.p50,
            p.p90,
            p.p99,
            p.p999,
            p.max
        );
    }
    say!(stderr, "(reads: share of reads; writes: share of requests)");
    say!(stderr);
    say!(
        stderr,
        "database reads: {} for {} reads; without a cache: {}; saved: {:.1}%; queries per 1,000 requests: {:.1} (without a cache: 1,000)",
        r.database_reads,
        r.reads,
        r.database_reads_without_cache,
        r.database_reads_saved * 100.0,
        r.database_queries_per_1000_requests
    );
    match &r.staleness_us {
        Some(s) => say!(
            stderr,
            "stale reads (a version older than an update that had returned): {} ({:.2} per 1,000 reads); \
             time since the update: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
            r.stale_reads,
            r.stale_reads as f64 * 1000.0 / r.reads.max(1) as f64,
            s.p50,
            s.p99,
            s.max
        ),
        None => say!(
            stderr,
            "stale reads (a version older than an update that had returned): 0"
        ),
    }
    say!(stderr);
    say!(stderr, "stats of instance 0:");
    say!(
        stderr,
        "{}",
        serde_json::to_string_pretty(&r.stats[0]).expect("stats serialize")
    );
    say!(stderr);
}

fn print_comparison(seed: &SimulationResult, ours: &SimulationResult, stderr: bool) {
    say!(stderr, "comparison (same workload):");
    say!(
        stderr,
        "{:<34} {:>14} {:>14} {:>14}",
        "",
        "no cache",
        "seed design",
        "tiercache"
    );
    say!(
        stderr,
        "{:<34} {:>14.1} {:>14.1} {:>14.1}",
        "database queries / 1,000 requests",
        1000.0,
        seed.database_queries_per_1000_requests,
        ours.database_queries_per_1000_requests
    );
    say!(
        stderr,
        "{:<34} {:>14} {:>14.2} {:>14.2}",
        "stale reads / 1,000 reads",
        "-",
        seed.stale_reads as f64 * 1000.0 / seed.reads.max(1) as f64,
        ours.stale_reads as f64 * 1000.0 / ours.reads.max(1) as f64
    );
    let max = |r: &SimulationResult| r.staleness_us.map_or(0.0, |s| s.max / 1000.0);
    say!(
        stderr,
        "{:<34} {:>14} {:>14.1} {:>14.1}",
        "longest staleness (ms)",
        "-",
        max(seed),
        max(ours)
    );
}

fn write_report(dir: &Path, results: &[SimulationResult]) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))
    };
    write(
        "simulate.json",
        serde_json::to_string_pretty(results).expect("results serialize"),
    )?;
    let ours = results.last().expect("at least one run");

    // Hit rate per tier over time.
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for (name, pick) in [
        ("memory", (|c: &Interval| c.memory) as fn(&Interval) -> u64),
        ("redis", |c| c.redis),
        ("database", |c| c.database),
    ] {
        if name == "redis" && !ours.redis {
            continue;
        }
        series.push((
            name,
            ours.timeline
                .iter()
                .filter(|c| c.reads > 0)
                .map(|c| {
                    (
                        c.end_ms as f64 / 1000.0,
                        pick(c) as f64 / c.reads as f64 * 100.0,
                    )
                })
                .collect(),
        ));
    }
    write(
        "hit_rate_over_time.svg",
        plot::lines(
            "Share of reads answered by each tier (tiercache)",
            "seconds since start",
            "% of reads",
            Some(100.0),
            &series,
        ),
    )?;

    // Latency percentiles per tier.
    let groups: Vec<(String, Vec<f64>)> = ours
        .latency_us
        .iter()
        .map(|(tier, p)| ((*tier).to_owned(), vec![p.p50, p.p90, p.p99]))
        .collect();
    write(
        "latency_percentiles.svg",
        plot::bars(
            "Latency per tier (tiercache)",
            "microseconds (log scale)",
            &["p50", "p90", "p99"],
            &groups,
            true,
        ),
    )?;

    // Database queries per 1,000 requests.
    let mut groups = vec![("no cache".to_owned(), vec![1000.0])];
    for r in results {
        let label = match r.mode {
            Mode::Seed => "seed design",
            Mode::Tiercache => "tiercache",
        };
        groups.push((label.to_owned(), vec![r.database_queries_per_1000_requests]));
    }
    write(
        "db_queries_per_1000.svg",
        plot::bars(
            "Database queries per 1,000 requests",
            "queries (log scale)",
            &["queries"],
            &groups,
            true,
        ),
    )?;

    // Cross-instance staleness.
    let groups: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|r| {
            let label = match r.mode {
                Mode::Seed => "seed design",
                Mode::Tiercache => "tiercache",
            };
            (
                label.to_owned(),
                vec![r.stale_reads as f64 * 1000.0 / r.reads.max(1) as f64],
            )
        })
        .collect();
    write(
        "stale_reads_per_1000.svg",
        plot::bars(
            "Reads older than an update that had returned, per 1,000 reads",
            "stale reads",
            &["stale reads"],
            &groups,
            false,
        ),
    )?;
    Ok(())
}
