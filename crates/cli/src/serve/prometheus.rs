//! `GET /metrics`: Prometheus text rendered from the instances' statistics at each scrape, so
//! it is always current and nothing has to export it first. Names follow
//! `TieredCache::export_metrics` (docs/grafana-dashboard.json draws them).

use std::fmt::Write as _;

use std::sync::atomic::Ordering;

use userconfig::{CacheStats, ConsistencyStats};

use super::listen::Connections;

/// One metric family: its help, its type, and its samples (labels, value).
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start<'o>(out: &'o mut String, name: &str, kind: &str, help: &str) -> Family<'o> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let escaped = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{escaped}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Renders every instance's statistics; `instance` labels tell the instances apart.
pub(crate) fn render(
    stats: &[CacheStats],
    http: &[((String, u16), u64)],
    connections: &Connections,
    streams_open: usize,
) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let instances: Vec<String> = (0..stats.len()).map(|i| i.to_string()).collect();
    let per_instance = |out: &mut String,
                        name: &str,
                        kind: &str,
                        help: &str,
                        value: &dyn Fn(&CacheStats) -> f64| {
        let mut f = Family::start(out, name, kind, help);
        for (s, i) in stats.iter().zip(&instances) {
            f.sample(name, &[("instance", i.as_str())], value(s));
        }
    };
    {
        let name = "tiercache_requests_total";
        let mut f = Family::start(
            &mut out,
            name,
            "counter",
            "Reads by the tier that answered and how (hit, found, not_found, stale, failed).",
        );
        for (s, i) in stats.iter().zip(&instances) {
            let c = &s.chain;
            for t in &c.tiers {
                f.sample(
                    name,
                    &[
                        ("instance", i.as_str()),
                        ("tier", t.name.as_str()),
                        ("outcome", "hit"),
                    ],
                    t.hits as f64,
                );
            }
            let source = c.source.name.as_str();
            for (tier, outcome, n) in [
                (source, "found", c.source.hits),
                (source, "not_found", c.not_found),
                ("any", "stale", c.stale_served),
                ("any", "failed", c.failed),
            ] {
                f.sample(
                    name,
                    &[
                        ("instance", i.as_str()),
                        ("tier", tier),
                        ("outcome", outcome),
                    ],
                    n as f64,
                );
            }
        }
    }
    type TierValue = fn(&userconfig::ChainTierStats) -> f64;
    let tier_families: [(&str, &str, &str, TierValue); 5] = [
        (
            "tiercache_tier_misses_total",
            "counter",
            "Lookups a tier did not answer.",
            |t| t.misses as f64,
        ),
        (
            "tiercache_tier_errors_total",
            "counter",
            "Calls to a tier that failed.",
            |t| t.errors as f64,
        ),
        (
            "tiercache_tier_timeouts_total",
            "counter",
            "Calls to a tier that ran out of time.",
            |t| t.timeouts as f64,
        ),
        (
            "tiercache_tier_skipped_total",
            "counter",
            "Calls skipped because the tier's breaker was open.",
            |t| t.skipped as f64,
        ),
        (
            "tiercache_breaker_open",
            "gauge",
            "1 while the tier's circuit breaker is open.",
            |t| {
                if t.breaker_open { 1.0 } else { 0.0 }
            },
        ),
    ];
    for (name, kind, help, value) in tier_families {
        let mut f = Family::start(&mut out, name, kind, help);
        for (s, i) in stats.iter().zip(&instances) {
            for t in s.chain.tiers.iter().chain(std::iter::once(&s.chain.source)) {
                f.sample(
                    name,
                    &[("instance", i.as_str()), ("tier", t.name.as_str())],
                    value(t),
                );
            }
        }
    }
    {
        let name = "tiercache_tier_latency_seconds";
        let mut f = Family::start(
            &mut out,
            name,
            "gauge",
            "Latency of the chain's calls to each tier since the start, by quantile.",
        );
        for (s, i) in stats.iter().zip(&instances) {
            for t in s.chain.tiers.iter().chain(std::iter::once(&s.chain.source)) {
                for (q, us) in [
                    ("0.5", t.latency.p50_us),
                    ("0.9", t.latency.p90_us),
                    ("0.99", t.latency.p99_us),
                ] {
                    f.sample(
                        name,
                        &[
                            ("instance", i.as_str()),
                            ("tier", t.name.as_str()),
                            ("quantile", q),
                        ],
                        us / 1e6,
                    );
                }
            }
        }
    }
    type StatsValue = fn(&CacheStats) -> f64;
    let chain: [(&str, &str, StatsValue); 8] = [
        (
            "tiercache_source_loads_total",
            "Loads that reached the database.",
            |s| s.chain.source_loads as f64,
        ),
        (
            "tiercache_coalesced_total",
            "Reads that shared another read's database load.",
            |s| s.chain.coalesced as f64,
        ),
        (
            "tiercache_updates_total",
            "Writes that changed the database.",
            |s| s.chain.updates as f64,
        ),
        (
            "tiercache_unchanged_writes_total",
            "Writes of the value already stored.",
            |s| s.chain.unchanged_writes as f64,
        ),
        (
            "tiercache_feed_changes_total",
            "Changes applied from the database's change feed.",
            |s| s.chain.feed_changes as f64,
        ),
        (
            "tiercache_feed_flushes_total",
            "Caches flushed because the change feed lost changes.",
            |s| s.chain.feed_flushes as f64,
        ),
        (
            "tiercache_remote_invalidations_total",
            "Invalidations received from other instances.",
            |s| s.chain.remote_invalidations as f64,
        ),
        (
            "tiercache_memory_evictions_total",
            "Memory entries evicted to make room.",
            |s| s.memory_cache.evictions as f64,
        ),
    ];
    for (name, help, value) in chain {
        per_instance(&mut out, name, "counter", help, &value);
    }
    per_instance(
        &mut out,
        "tiercache_memory_entries",
        "gauge",
        "Entries in the memory tier.",
        &|s| s.memory_cache.entries as f64,
    );
    per_instance(
        &mut out,
        "tiercache_memory_capacity",
        "gauge",
        "The memory tier's capacity.",
        &|s| s.memory_cache.max_size as f64,
    );
    per_instance(
        &mut out,
        "tiercache_redis_connected",
        "gauge",
        "1 if the last Redis command reached Redis.",
        &|s| {
            if s.redis_cache.connected { 1.0 } else { 0.0 }
        },
    );
    // The database's change feed, for the instances that follow one.
    let feeds: Vec<(&String, &userconfig::FeedStats)> = instances
        .iter()
        .zip(stats)
        .filter_map(|(i, s)| s.chain.feed.as_ref().map(|f| (i, f)))
        .collect();
    for (name, help, value) in [
        (
            "tiercache_feed_connected",
            "1 while the instance's follower of the database's change feed is connected.",
            (|f| f.connected) as fn(&userconfig::FeedStats) -> bool,
        ),
        (
            "tiercache_feed_elected",
            "1 while the instance's follower is the one elected to read the change log.",
            |f| f.elected,
        ),
    ] {
        let mut f = Family::start(&mut out, name, "gauge", help);
        for (i, feed) in &feeds {
            f.sample(
                name,
                &[("instance", i.as_str())],
                if value(feed) { 1.0 } else { 0.0 },
            );
        }
    }
    {
        let name = "tiercache_feed_lag_seconds";
        let mut f = Family::start(
            &mut out,
            name,
            "gauge",
            "From a change's commit (its log entry's time) to the instance having applied it, \
             since the start, by quantile.",
        );
        for (i, feed) in &feeds {
            for (q, us) in [
                ("0.5", feed.lag.p50_us),
                ("0.9", feed.lag.p90_us),
                ("0.99", feed.lag.p99_us),
                ("1", feed.lag.max_us),
            ] {
                f.sample(name, &[("instance", i.as_str()), ("quantile", q)], us / 1e6);
            }
        }
    }
    for (name, help, pick) in [
        (
            "tiercache_consistency_checked_total",
            "Reads a cache answered that the consistency verifier checked against the database's \
             history, by tier.",
            (|c: &ConsistencyStats| (c.checked_memory, c.checked_redis))
                as fn(&ConsistencyStats) -> (u64, u64),
        ),
        (
            "tiercache_consistency_inconsistent_total",
            "Of those, reads that served a copy replaced more than the grace before, by tier.",
            |c: &ConsistencyStats| (c.inconsistent_memory, c.inconsistent_redis),
        ),
    ] {
        let mut f = Family::start(&mut out, name, "counter", help);
        for (s, i) in stats.iter().zip(&instances) {
            let (memory, redis) = pick(&s.consistency);
            for (tier, n) in [("memory", memory), ("redis", redis)] {
                f.sample(name, &[("instance", i.as_str()), ("tier", tier)], n as f64);
            }
        }
    }
    per_instance(
        &mut out,
        "tiercache_consistency_nines",
        "gauge",
        "Consistency over the last hour in nines: -log10 of the inconsistent share (with none, \
         log10 of the reads checked, a lower bound); NaN before any check.",
        &|s| s.consistency.nines_last_hour.unwrap_or(f64::NAN),
    );
    {
        let name = "userconfig_http_requests_total";
        let mut f = Family::start(
            &mut out,
            name,
            "counter",
            "HTTP requests by route and status.",
        );
        for ((route, status), n) in http {
            f.sample(
                name,
                &[("route", route), ("status", &status.to_string())],
                *n as f64,
            );
        }
    }
    for (name, help, count) in [
        (
            "userconfig_http_connections_refused_total",
            "Connections answered 503 and closed: --max-connections were open.",
            &connections.refused,
        ),
        (
            "userconfig_http_connections_dropped_total",
            "Connections still open at the shutdown deadline, closed.",
            &connections.dropped,
        ),
    ] {
        let mut f = Family::start(&mut out, name, "counter", help);
        f.sample(name, &[], count.load(Ordering::Relaxed) as f64);
    }
    {
        let name = "userconfig_http_streams_open";
        let mut f = Family::start(
            &mut out,
            name,
            "gauge",
            "Event streams open now (/v1/users/{id}/config/events).",
        );
        f.sample(name, &[], streams_open as f64);
    }
    out
}
