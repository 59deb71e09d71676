//! Every error response `serve` gives: one JSON shape a client can act on, and the cause
//! for the operator's log only.
//!
//! ```json
//! {"error": {"kind": "unavailable", "message": "…", "request_id": "5f0c…"}}
//! ```
//!
//! `kind` is stable (`invalid_input`, `unauthorized`, `forbidden`, `not_found`, `conflict`,
//! `too_many_conflicts`, `rate_limited`, `overloaded`, `timeout`, `unavailable`, `read_only`,
//! `internal`); `message` says what the caller can do, never repeating a configuration value,
//! and for a failure of the service (5xx) never the cause: its chain (which may name tables,
//! SQL or hosts) is logged at warn with the same `request_id`, which every response also
//! carries as `X-Request-Id`. A 412 adds `current_version` (and the `ETag`); a 503 or 429
//! `Retry-After`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

use super::observe;

/// Every error's body.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong, for the caller.
#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable: `invalid_input`, `unauthorized`, `forbidden`, `not_found`, `conflict`,
    /// `too_many_conflicts`, `rate_limited`, `overloaded`, `timeout`, `unavailable`,
    /// `read_only`, `internal`.
    #[schema(value_type = String)]
    kind: &'static str,
    /// What the caller can do; never a configuration value, never a cause inside the service.
    message: String,
    /// The request's id (also its `X-Request-Id`), under which the log has the cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// For a 412: the version stored now.
    #[serde(skip_serializing_if = "Option::is_none")]
    current_version: Option<u64>,
}

/// The refusals a route may answer (an operator's route never a 400).
#[derive(IntoResponses)]
#[allow(dead_code)] // a description of responses for the OpenAPI document, never built
pub(crate) enum Refusals {
    /// Bad input (a user id, a body, a precondition header), refused before any I/O.
    #[response(status = 400)]
    InvalidInput(ErrorBody),
    /// No credential, or one this service does not take.
    #[response(status = 401, headers(("WWW-Authenticate" = String)))]
    Unauthorized(ErrorBody),
    /// A credential without this route's scope, or an end user's for another user.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The token's rate is spent.
    #[response(status = 429, headers(("Retry-After" = u64)))]
    RateLimited(ErrorBody),
    /// The service failed; the log has the cause under the request id.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// Overloaded, timed out, the database unreachable, or a standby taking no writes.
    #[response(status = 503, headers(("Retry-After" = u64)))]
    Unavailable(ErrorBody),
}

/// An error response (boxed: handlers return it on their error path only).
#[derive(Debug)]
pub(crate) struct ApiError(Box<Parts>);

#[derive(Debug)]
struct Parts {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// For a 412: the stored version.
    current: Option<u64>,
    /// Why the service failed, for the log only.
    cause: Option<String>,
    /// For a 401: the `WWW-Authenticate` challenge.
    challenge: Option<HeaderValue>,
    /// For a 503 or 429: seconds to wait.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError(Box::new(Parts {
            status,
            kind,
            message: message.into(),
            current: None,
            cause: None,
            challenge: None,
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        }))
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// 412: a precondition failed against `current`, the stored version (sent as `ETag`).
    pub(crate) fn precondition_failed(current: u64) -> Self {
        let mut e = ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "conflict",
            format!(
                "the stored configuration is at version {current}, which the request's \
                 If-Match or If-None-Match does not allow"
            ),
        );
        e.0.current = Some(current);
        e
    }

    /// 401 with a Bearer challenge (`problem`: RFC 6750's `error`, when a token was given).
    pub(crate) fn unauthorized(problem: Option<&str>, message: impl Into<String>) -> Self {
        let challenge = match problem {
            Some(problem) => format!("Bearer realm=\"userconfig\", error=\"{problem}\""),
            None => "Bearer realm=\"userconfig\"".to_owned(),
        };
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.0.challenge = HeaderValue::from_str(&challenge).ok();
        e
    }

    /// 403: who asks is known and may not do this.
    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 503 for a limit of this instance (`kind`: `overloaded`, `timeout`), to retry soon.
    pub(crate) fn busy(kind: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, message)
    }

    /// 429: this caller's rate is spent for `seconds`.
    pub(crate) fn rate_limited(seconds: u64) -> Self {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from this token; retry in {seconds} s"),
        );
        e.0.retry_after = Some(seconds.max(1));
        e
    }

    /// A failure of the service: the client hears `message`, the log `cause`.
    pub(crate) fn failed(
        status: StatusCode,
        kind: &'static str,
        message: &str,
        cause: String,
    ) -> Self {
        let mut e = ApiError::new(status, kind, message);
        e.0.cause = Some(cause);
        e
    }
}

impl From<userconfig::Error> for ApiError {
    fn from(e: userconfig::Error) -> Self {
        let explained = crate::explain(&e);
        if e.is_invalid_input() {
            // The caller's own input, named so it can be fixed.
            return ApiError::bad_request(explained);
        }
        if let Some(current) = e.conflict() {
            let mut error = ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", explained);
            error.0.current = Some(current);
            return error;
        }
        if matches!(e, userconfig::Error::TooManyConflicts { .. }) {
            return ApiError::new(StatusCode::CONFLICT, "too_many_conflicts", explained);
        }
        let (status, kind, message) = if e.is_transient() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the configuration store cannot be reached now; retry after Retry-After",
            )
        } else if e.is_read_only() {
            // A standby: this instance may serve reads, not writes.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "read_only",
                "this instance's database takes no writes now (a standby); retry, or write \
                 through the primary",
            )
        } else {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the service failed; its log names the cause under this request id",
            )
        };
        ApiError::failed(status, kind, message, explained)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = *self.0;
        let request_id = observe::request_id();
        if let Some(cause) = &this.cause {
            tracing::warn!(
                request_id = request_id.as_deref().unwrap_or("-"),
                status = this.status.as_u16(),
                kind = this.kind,
                "request failed: {cause}"
            );
        }
        let body = ErrorBody {
            error: ErrorDetail {
                kind: this.kind,
                message: this.message,
                request_id: request_id.as_deref().map(str::to_owned),
                current_version: this.current,
            },
        };
        let mut response = (this.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = this.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(current) = this.current {
            headers.insert(header::ETAG, super::api::etag(current));
        }
        if let Some(challenge) = this.challenge {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}
