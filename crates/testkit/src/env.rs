//! Where the test servers are, names that keep parallel tests apart, and the message a test
//! gives when a server is not there.
//!
//! Integration tests read `REDIS_URL` and `DATABASE_URL`, defaulting to the local servers, and
//! isolate themselves with [`unique_name`] (a Redis key prefix, a PostgreSQL schema). When a
//! server cannot be reached they fail with [`unreachable()`]'s message, which names the variable
//! and the command that starts the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The variable naming the Redis server.
pub const REDIS_URL_VAR: &str = "REDIS_URL";
/// Redis when `REDIS_URL` is not set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// How to start the local Redis.
pub const REDIS_START: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
     --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log";

/// The variable naming the PostgreSQL server.
pub const DATABASE_URL_VAR: &str = "DATABASE_URL";
/// PostgreSQL when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// How to start the local PostgreSQL.
pub const POSTGRES_START: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

/// `REDIS_URL`, or the local server.
#[must_use]
pub fn redis_url() -> String {
    std::env::var(REDIS_URL_VAR).unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// `DATABASE_URL`, or the local server.
#[must_use]
pub fn database_url() -> String {
    std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A name no other test in any process has used: lowercase letters, digits and `_`, starting
/// with `tc_` and `tag` (itself reduced to those characters), usable as a Redis key prefix or a
/// PostgreSQL schema name.
#[must_use]
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tag: String = tag
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tc_{tag}_{}_{}_{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The message for a server that cannot be reached: which variable names it, and how to start
/// the local one.
#[must_use]
pub fn unreachable(
    server: &str,
    variable: &str,
    start: &str,
    error: &dyn std::fmt::Display,
) -> String {
    format!(
        "{server} is unreachable ({error}). Set {variable} to a reachable server, or start the \
         local one with: {start}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_unique_and_safe() {
        let a = unique_name("Redis Contract!");
        let b = unique_name("Redis Contract!");
        assert_ne!(a, b);
        assert!(a.starts_with("tc_redis_contract_"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn the_message_names_the_variable_and_the_command() {
        let m = unreachable("Redis", REDIS_URL_VAR, REDIS_START, &"connection refused");
        assert!(m.contains("REDIS_URL") && m.contains("redis-server --daemonize yes"));
    }
}
