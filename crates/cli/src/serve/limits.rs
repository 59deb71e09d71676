//! The limits that keep one instance answering whoever behaves: how long a connection may
//! take to send a request head or stay idle, how long a request may take, how many
//! connections and requests it holds at once, how fast each token may ask, and how long a
//! shutdown waits.
//!
//! The request limits are tower's layers (`load_shed`, a global `concurrency_limit`,
//! `timeout`, layered in `mod.rs`), turned into JSON errors by [`refused`]; the connection
//! limits are the accept loop's (`listen.rs`), the rate per token the authentication's
//! (`rate.rs`).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use clap::Args;
use tower::BoxError;

use super::error::ApiError;

/// The limits of `userconfig serve`.
#[derive(Clone, Debug, Args)]
pub(crate) struct Limits {
    /// Seconds a connection may take to send a request's head, and may stay idle between
    /// requests, before it is closed (slow or silent clients hold nothing for long).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    pub(crate) header_timeout: Duration,
    /// Seconds a request may take from its head to its response, body included; past it the
    /// answer is 503 (`kind: timeout`). A change the database already took stays taken.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = seconds)]
    pub(crate) request_timeout: Duration,
    /// Connections open at once; past it a new connection is answered 503 and closed.
    /// Default: what the process's file descriptor limit allows (raised to its hard limit at
    /// start), less 256 for the database, Redis and files.
    #[arg(long, value_name = "N")]
    pub(crate) max_connections: Option<usize>,
    /// Requests answered at once; past it 503 with `Retry-After` (`kind: overloaded`), never
    /// a queue. `/healthz` is not counted.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub(crate) max_in_flight: usize,
    /// Requests per second each service token may make (as a burst too); past it 429 with
    /// `Retry-After`. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) rate_per_token: u32,
    /// Event streams (`/v1/users/{id}/config/events`) open at once on this instance; past it
    /// 503 `too_many_streams`.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub(crate) max_streams: usize,
    /// Event streams one caller (a service token, an end user) may hold open at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub(crate) max_streams_per_token: usize,
    /// Seconds between heartbeats (a comment line) on an idle event stream.
    #[arg(long, value_name = "SECS", default_value = "15", value_parser = seconds)]
    pub(crate) stream_heartbeat: Duration,
    /// Seconds a shutdown waits for requests in flight; then the connections still open are
    /// closed and pending cache work is flushed all the same.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = seconds)]
    pub(crate) shutdown_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: None,
            max_in_flight: 512,
            rate_per_token: 0,
            max_streams: 10_000,
            max_streams_per_token: 16,
            stream_heartbeat: Duration::from_secs(15),
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

/// The connections a process may hold when not told: its file descriptor limit (the soft
/// one raised to the hard one first, as Go's runtime does), less 256 kept for the database,
/// Redis and files; at least 64.
pub(crate) fn auto_connections() -> usize {
    const CEILING: u64 = 1 << 20;
    #[cfg(unix)]
    let open = {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        let hard = limit.maximum.unwrap_or(CEILING).min(CEILING);
        if limit.current.is_some_and(|soft| soft < hard) {
            limit.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::debug!(error = %e, "cannot raise the file descriptor limit");
            }
        }
        getrlimit(Resource::Nofile).current.unwrap_or(CEILING)
    };
    #[cfg(not(unix))]
    let open = 4096 + 256;
    usize::try_from(open.saturating_sub(256).clamp(64, CEILING)).unwrap_or(64)
}

/// A positive number of seconds (fractions allowed).
fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a positive number of seconds"))
}

/// What a shed or timed-out request is answered.
pub(crate) async fn refused(error: BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::busy(
            "overloaded",
            "this instance is answering as many requests as it may; retry after Retry-After",
        )
        .into_response()
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::busy(
            "timeout",
            "the request took longer than this instance allows; a change may have been \
             stored all the same (read it before writing again)",
        )
        .into_response()
    } else {
        ApiError::failed(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the service failed; its log names the cause under this request id",
            error.to_string(),
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_positive_and_finite() {
        assert_eq!(seconds("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["0", "-1", "inf", "NaN", "soon", "1e12"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
    }
}
