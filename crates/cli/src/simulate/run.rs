//! One run of the simulator: the instances, the users stored first, the workers, and what
//! they measured merged and summed up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use userconfig::{Answer, CacheStats, UserConfig, UserConfigStorage};

use super::args::{Mode, SimulateArgs, check};
use super::report::{print_comparison, print_report, write_report};
use super::result::{Consistency, Interval, SimulationResult, percentiles};
use super::stale::Latest;
use super::workload::{Latencies, Zipf};
use crate::serve::{self, window::Window};
use crate::{Connection, Failure};

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

/// One run of `mode` over `storages`: the users stored, then the workload, then the result.
async fn drive(
    args: &SimulateArgs,
    mode: Mode,
    storages: &[UserConfigStorage],
    run_id: &str,
    window: &Arc<Window>,
) -> Result<SimulationResult, Failure> {
    store_users(args, &storages[0], run_id).await?;
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
    let started = Instant::now();
    let workers = spawn_workers(
        args,
        storages,
        run_id,
        window,
        started,
        (&zipf, &latest, &done),
    );
    let merged = merge(workers, args.interval_ms).await;
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    let stats: Vec<CacheStats> = storages.iter().map(|s| s.get_cache_stats()).collect();
    Ok(summarize(
        args, mode, run_id, merged?, stats, before, elapsed,
    ))
}

/// Stores the configurations of the `--stored` share of users through `storage`, eight at a
/// time; a transient failure is retried (this is set-up, not what is measured) and reported.
async fn store_users(
    args: &SimulateArgs,
    storage: &UserConfigStorage,
    run_id: &str,
) -> Result<(), Failure> {
    let stored = (args.users as f64 * args.stored).round() as usize;
    let bar = progress(stored as u64, "storing", args.no_progress);
    let seeders = 8.min(stored.max(1));
    let retried = Arc::new(AtomicU64::new(0));
    let mut seeding = Vec::new();
    for s in 0..seeders {
        let storage = storage.clone();
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
    Ok(())
}

/// The workload's tasks, `--concurrency` per instance, sharing the `--requests` between
/// them: each reads or writes a Zipf-popular user, records updates in `latest` (and judges
/// reads by it), counts into `done`, and keeps what it measured.
fn spawn_workers(
    args: &SimulateArgs,
    storages: &[UserConfigStorage],
    run_id: &str,
    window: &Arc<Window>,
    started: Instant,
    (zipf, latest, done): (&Arc<Zipf>, &Arc<Latest>, &Arc<AtomicU64>),
) -> Vec<tokio::task::JoinHandle<Result<TaskOutcome, userconfig::Error>>> {
    let tasks_total = (args.instances * args.concurrency) as u64;
    let interval = Duration::from_millis(args.interval_ms);
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
    tasks
}

/// Every task's outcome in one, the timeline's intervals stamped with their ends.
async fn merge(
    tasks: Vec<tokio::task::JoinHandle<Result<TaskOutcome, userconfig::Error>>>,
    interval_ms: u64,
) -> Result<TaskOutcome, Failure> {
    let mut merged = TaskOutcome::default();
    for task in tasks {
        let outcome = task.await.expect("workload task panicked")?;
        for (tier, l) in outcome.by_tier {
            merged.by_tier.entry(tier).or_default().merge(l);
        }
        merged.writes.merge(outcome.writes);
        merged.staleness.merge(outcome.staleness);
        if merged.timeline.len() < outcome.timeline.len() {
            merged
                .timeline
                .resize(outcome.timeline.len(), Interval::default());
        }
        for (mine, theirs) in merged.timeline.iter_mut().zip(outcome.timeline) {
            mine.reads += theirs.reads;
            mine.memory += theirs.memory;
            mine.redis += theirs.redis;
            mine.database += theirs.database;
            mine.stale_reads += theirs.stale_reads;
        }
    }
    for (i, cell) in merged.timeline.iter_mut().enumerate() {
        cell.end_ms = (i as u64 + 1) * interval_ms;
    }
    Ok(merged)
}

/// The run's result from what the tasks measured and the instances' statistics after it
/// (`before`: the database loads before it).
fn summarize(
    args: &SimulateArgs,
    mode: Mode,
    run_id: &str,
    merged: TaskOutcome,
    stats: Vec<CacheStats>,
    before: u64,
    elapsed: Duration,
) -> SimulationResult {
    let TaskOutcome {
        mut by_tier,
        mut writes,
        mut staleness,
        timeline,
    } = merged;
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
    SimulationResult {
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
        consistency: Consistency::of(&stats),
        timeline,
        stats,
    }
}
