//! The reports of a run: the text on the terminal, the comparison of two designs, and the JSON
//! and SVG files of `--out`.

use std::path::Path;

use super::args::Mode;
use super::plot;
use super::result::{Interval, SimulationResult};
use crate::Failure;

pub(super) fn print_report(r: &SimulationResult, stderr: bool) {
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
    let c = &r.consistency;
    match c.nines {
        Some(nines) => say!(
            stderr,
            "consistency verifier (1 cache hit in {} checked against the database's history {} ms \
             later): {} inconsistent of {} checked, {}{:.1} nines",
            c.sample_one_in,
            c.grace_ms,
            c.inconsistent,
            c.checked,
            if c.inconsistent == 0 { ">= " } else { "" },
            nines
        ),
        None => say!(
            stderr,
            "consistency verifier: no check finished during the run (1 cache hit in {} is \
             checked {} ms after it)",
            c.sample_one_in,
            c.grace_ms
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

pub(super) fn print_comparison(seed: &SimulationResult, ours: &SimulationResult, stderr: bool) {
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

pub(super) fn write_report(dir: &Path, results: &[SimulationResult]) -> Result<(), Failure> {
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
