//! What each request leaves behind: its id (`X-Request-Id`, in every error body and log line
//! about it), its count by route template, method and status (for `/metrics`), and one access
//! log line.
//!
//! The access log is an `info` event with the target `access`: method, route template (never
//! the user id), status, latency in microseconds and request id; never a header, a body or a
//! token. `userconfig serve` shows it by default; `RUST_LOG=warn,access=off` turns it off.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

tokio::task_local! {
    /// The id of the request this task is answering.
    static REQUEST_ID: Arc<str>;
}

/// The id of the request being answered, inside [`observe`] (`None` outside a request).
pub(crate) fn request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// The route templates requests are counted by; anything else is `unmatched`.
pub(crate) const ROUTES: [&str; 14] = [
    "/v1/changes",
    "/v1/users/{id}/config",
    "/v1/users/{id}/config/events",
    "/v1/users/{id}/config/history",
    "/v1/users/{id}/config/diff",
    "/v1/users/{id}/config/rollback",
    "/openapi.json",
    "/stats",
    "/metrics",
    "/healthz",
    "/readyz",
    "/",
    "/dashboard/data",
    "unmatched",
];

/// The methods requests are counted by; anything else is `OTHER`.
pub(crate) const METHODS: [&str; 6] = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OTHER"];

/// Requests by route, method and status (indexes into [`ROUTES`] and [`METHODS`]: counting
/// allocates nothing once a combination has been seen).
#[derive(Default)]
pub(crate) struct Requests(Mutex<BTreeMap<(u8, u8, u16), u64>>);

impl Requests {
    /// `("METHOD route", status)` and its count, for `/metrics`.
    pub(crate) fn counts(&self) -> Vec<((String, u16), u64)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&(route, method, status), n)| {
                let label = format!("{} {}", METHODS[method as usize], ROUTES[route as usize]);
                ((label, status), *n)
            })
            .collect()
    }
}

/// The id a request goes by: the caller's `X-Request-Id` if it is a short token (letters,
/// digits, `-_.:`, at most 64), so a proxy's id carries through; else a new one.
fn id_for(request: &Request) -> Arc<str> {
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(
            || Arc::from(format!("{:016x}", fastrand::u64(..))),
            Arc::from,
        )
}

/// The middleware, outside every other: the id, then the request, then its count and log line.
pub(crate) async fn observe(
    State(requests): State<Arc<Requests>>,
    request: Request,
    next: Next,
) -> Response {
    let began = Instant::now();
    let id = id_for(&request);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| ROUTES.iter().position(|r| *r == p.as_str()))
        .unwrap_or(ROUTES.len() - 1);
    let method = METHODS
        .iter()
        .position(|m| *m == request.method().as_str())
        .unwrap_or(METHODS.len() - 1);
    let mut response = REQUEST_ID.scope(Arc::clone(&id), next.run(request)).await;
    let status = response.status().as_u16();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    *requests
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((route as u8, method as u8, status))
        .or_default() += 1;
    tracing::info!(
        target: "access",
        method = METHODS[method],
        route = ROUTES[route],
        status,
        micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
        request_id = &*id,
    );
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    fn with_id(id: &str) -> Arc<str> {
        id_for(
            &Request::builder()
                .header("x-request-id", id)
                .body(Body::empty())
                .unwrap(),
        )
    }

    #[test]
    fn a_callers_id_is_kept_only_when_it_is_a_short_token() {
        assert_eq!(&*with_id("lb-7f3a:2"), "lb-7f3a:2");
        for odd in ["", "a b", "é", &"x".repeat(65), "line\"quote"] {
            let made = id_for(
                &Request::builder()
                    .header(
                        "x-request-id",
                        HeaderValue::from_bytes(odd.as_bytes()).unwrap(),
                    )
                    .body(Body::empty())
                    .unwrap(),
            );
            assert_eq!(made.len(), 16, "{odd:?} replaced by a new id");
            assert_ne!(&*made, odd);
        }
        let a = id_for(&Request::new(Body::empty()));
        let b = id_for(&Request::new(Body::empty()));
        assert_ne!(a, b, "new ids differ");
    }
}
