//! `userconfig simulate`: several service instances in one process, sharing Redis and the
//! database, under a Zipf-popular read/write workload; what each tier answered, how fast, and
//! how many database reads the cache saved.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use userconfig::{Answer, CacheStats, UserConfig, UserConfigStorage};

use crate::workload::{Latencies, Zipf};
use crate::{Connection, Failure};

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
    /// Random seed (the run is reproducible up to the interleaving of tasks).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// The machine-readable result.
#[derive(Debug, Serialize)]
struct SimulationResult {
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
    stats: Vec<CacheStats>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Default)]
struct TaskOutcome {
    by_tier: BTreeMap<&'static str, Latencies>,
    writes: Latencies,
}

pub(crate) async fn run(args: SimulateArgs, connection: Connection) -> Result<(), Failure> {
    check(&args)?;
    let run_id = format!("{:x}", args.seed ^ u64::from(std::process::id()));
    let temp_db = connection
        .database_url
        .is_none()
        .then(|| std::env::temp_dir().join(format!("userconfig-simulate-{run_id}.sqlite3")));

    let mut storages = Vec::with_capacity(args.instances);
    for i in 0..args.instances {
        let mut builder = UserConfigStorage::builder()
            .memory_capacity(args.memory_capacity)
            // Simulated users live under their own Redis prefix, apart from real ones.
            .redis_prefix(format!("userconfig-sim:{run_id}:"));
        if let Some(url) = &connection.redis_url {
            builder = builder.redis_url(url.clone());
        }
        builder = match (i, &connection.database_url, &temp_db) {
            (0, Some(url), _) => builder.database_url(url.clone()),
            (0, None, Some(path)) => builder.sqlite_path(path.clone()),
            _ => builder.share_database(&storages[0]),
        };
        storages.push(builder.build().await?);
    }
    let result = drive(&args, &storages, &run_id).await;
    if let Some(path) = &temp_db {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
    let result = result?;
    print_report(&result);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result).expect("results serialize");
        std::fs::write(path, text)
            .map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("result written to {}", path.display());
    }
    Ok(())
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
    } else {
        return Ok(());
    };
    Err(Failure::new(problem))
}

fn user_id(run_id: &str, rank: usize) -> String {
    format!("sim-{run_id}-{rank}")
}

fn config_for(user: &str, step: u64) -> UserConfig {
    let mut c = UserConfig::default_for(user);
    c.preferences.theme = if step % 2 == 0 { "dark" } else { "light" }.to_owned();
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

async fn drive(
    args: &SimulateArgs,
    storages: &[UserConfigStorage],
    run_id: &str,
) -> Result<SimulationResult, Failure> {
    // Store the configurations of the `stored` share of users, through instance 0.
    let stored = (args.users as f64 * args.stored).round() as usize;
    let bar = progress(stored as u64, "storing", args.no_progress);
    let seeders = 8.min(stored.max(1));
    let mut seeding = Vec::new();
    for s in 0..seeders {
        let storage = storages[0].clone();
        let run_id = run_id.to_owned();
        let bar = bar.clone();
        seeding.push(tokio::spawn(async move {
            for rank in (s..stored).step_by(seeders) {
                let user = user_id(&run_id, rank);
                storage
                    .update_user_config(&user, &config_for(&user, 0))
                    .await?;
                bar.inc(1);
            }
            Ok::<(), userconfig::Error>(())
        }));
    }
    for s in seeding {
        s.await.expect("seeding task panicked")?;
    }
    bar.finish_and_clear();
    // Start from cold caches, as a fresh deployment would, and count only the run.
    for storage in storages {
        storage.clear_memory_cache();
    }
    let before: u64 = storages
        .iter()
        .map(|s| s.get_cache_stats().chain.source_loads)
        .sum();

    let zipf = Arc::new(Zipf::new(args.users, args.zipf));
    let done = Arc::new(AtomicU64::new(0));
    let tasks_total = (args.instances * args.concurrency) as u64;
    let bar = progress(args.requests, "requests", args.no_progress);
    let ticker = {
        let (bar, done) = (bar.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, storage) in storages.iter().enumerate() {
        for t in 0..args.concurrency {
            let task_index = (i * args.concurrency + t) as u64;
            let share =
                args.requests / tasks_total + u64::from(task_index < args.requests % tasks_total);
            let storage = storage.clone();
            let (zipf, done) = (zipf.clone(), done.clone());
            let run_id = run_id.to_owned();
            let write_ratio = args.write_ratio;
            let mut rng = fastrand::Rng::with_seed(args.seed.wrapping_add(task_index));
            tasks.push(tokio::spawn(async move {
                let mut outcome = TaskOutcome::default();
                for step in 0..share {
                    let user = user_id(&run_id, zipf.sample(&mut rng));
                    let start = Instant::now();
                    if rng.f64() < write_ratio {
                        storage
                            .update_user_config(&user, &config_for(&user, step + 1))
                            .await?;
                        outcome.writes.record(start.elapsed());
                    } else {
                        let fetched = storage.fetch_user_config(&user).await?;
                        let took = start.elapsed();
                        outcome
                            .by_tier
                            .entry(fetched.answered_by.as_str())
                            .or_default()
                            .record(took);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<TaskOutcome, userconfig::Error>(outcome)
            }));
        }
    }
    let mut by_tier: BTreeMap<&'static str, Latencies> = BTreeMap::new();
    let mut writes = Latencies::default();
    for task in tasks {
        let outcome = task.await.expect("workload task panicked")?;
        for (tier, l) in outcome.by_tier {
            by_tier.entry(tier).or_default().merge(l);
        }
        writes.merge(outcome.writes);
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
    let mut percentiles = |name: &'static str, l: &mut Latencies| {
        let p = l.percentiles(&[50.0, 90.0, 99.0, 99.9, 100.0]);
        if let [p50, p90, p99, p999, max] = p[..] {
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            latency_us.insert(
                name,
                Percentiles {
                    count: l.len(),
                    p50: us(p50),
                    p90: us(p90),
                    p99: us(p99),
                    p999: us(p999),
                    max: us(max),
                },
            );
        }
    };
    for (tier, l) in &mut by_tier {
        percentiles(tier, l);
    }
    percentiles("writes", &mut writes);
    let requests = reads + writes.len() as u64;
    Ok(SimulationResult {
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
        stats,
    })
}

fn print_report(r: &SimulationResult) {
    println!(
        "{} instances x {} tasks, {} users (Zipf {}), {} requests ({} writes) in {:.2} s: {:.0} requests/s",
        r.instances,
        r.concurrency,
        r.users,
        r.zipf_exponent,
        r.requests,
        r.writes,
        r.elapsed_seconds,
        r.requests_per_second
    );
    println!(
        "tiers: memory{} -> {}",
        if r.redis { " -> redis" } else { "" },
        r.database
    );
    println!();
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "answered", "share", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
    );
    for (tier, p) in &r.latency_us {
        let share = match *tier {
            "writes" => r.writes as f64 / r.requests.max(1) as f64,
            t => r.answered_by.get(t).copied().unwrap_or(0.0),
        };
        println!(
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
    println!("(reads: share of reads; writes: share of requests)");
    println!();
    println!(
        "database reads: {} for {} reads; without a cache: {}; saved: {:.1}%",
        r.database_reads,
        r.reads,
        r.database_reads_without_cache,
        r.database_reads_saved * 100.0
    );
    println!();
    println!("stats of instance 0:");
    println!(
        "{}",
        serde_json::to_string_pretty(&r.stats[0]).expect("stats serialize")
    );
}
