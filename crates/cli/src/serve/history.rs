//! A user's past configurations over HTTP: the history, a past version, the difference
//! between two versions, and rollback (the database's history: every change by any writer,
//! kept 30 days by default; `userconfig::UserConfigStorage::history`).
//!
//! | route | scope | what |
//! |---|---|---|
//! | `GET /v1/users/{id}/config/history?limit=N&before=V` | read | past versions, newest first |
//! | `GET /v1/users/{id}/config?version=N` | read | one past version (`api.rs`; 404 `not_kept`) |
//! | `GET /v1/users/{id}/config/diff?from=A&to=B` | read | a JSON Patch (RFC 6902) from A to B |
//! | `POST /v1/users/{id}/config/rollback` `{"version": N}` | write | a new version holding N's configuration; `If-Match` pins the version it replaces (else the stored one), 412 if a write landed in between |

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use userconfig::{ConfigRevision, UserConfig};
use utoipa::{IntoParams, ToSchema};

use super::App;
use super::api::{UserPath, etag};
use super::auth::Caller;
use super::conditional::{PreconditionHeaders, Preconditions};
use super::error::{ApiError, ErrorBody, Refusals};

/// Versions a history page holds when the client does not say.
const DEFAULT_LIMIT: usize = 50;

/// `name`'s value in the query string, as a number (`None` when absent).
pub(crate) fn query_u64(uri: &Uri, name: &str) -> Result<Option<u64>, ApiError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            // Versions are the database's bigint: at most 2^63 - 1.
            return value
                .parse::<u64>()
                .ok()
                .filter(|n| i64::try_from(*n).is_ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "the query parameter {name} must be a number from 0 to 2^63 - 1"
                    ))
                });
        }
    }
    Ok(None)
}

/// Whether the query string holds `name=true`.
pub(crate) fn query_flag(uri: &Uri, name: &str) -> Result<bool, ApiError> {
    let Some(query) = uri.query() else {
        return Ok(false);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if key == name {
            return match value {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::bad_request(format!(
                    "the query parameter {name} must be true or false"
                ))),
            };
        }
    }
    Ok(false)
}

/// One past version.
#[derive(Serialize, ToSchema)]
pub(crate) struct RevisionBody {
    /// The change's version.
    version: u64,
    /// Whether it stored a configuration (false: it deleted it; `config` is then the defaults).
    stored: bool,
    /// When it was written (RFC 3339, UTC).
    at: String,
    /// Who wrote it: the writing session's `application_name`, as the database knows it.
    author: Option<String>,
    /// The configuration it stored (the defaults after a delete).
    #[schema(value_type = UserConfig)]
    config: Arc<UserConfig>,
}

impl RevisionBody {
    pub(crate) fn new(user_id: &str, revision: &ConfigRevision) -> Self {
        RevisionBody {
            version: revision.version,
            stored: revision.config.is_some(),
            at: revision.at_rfc3339(),
            author: revision.author.clone(),
            config: revision.config_or_defaults(user_id),
        }
    }
}

/// A history page.
#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryBody {
    /// The user.
    user_id: String,
    /// Newest first.
    versions: Vec<RevisionBody>,
}

/// The history's query.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // a description for the OpenAPI document; `query_u64` reads it
pub(crate) struct HistoryQuery {
    /// Versions to return, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
    /// Only versions older than this one (the last version of the previous page).
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    before: Option<u64>,
}

/// `GET /v1/users/{id}/config/history`.
#[utoipa::path(
    get,
    path = "/v1/users/{id}/config/history",
    tag = "configuration",
    params(UserPath, HistoryQuery),
    responses(
        (status = 200, description = "Past versions, newest first", body = HistoryBody),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn history(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    userconfig::check_user_id(&id)?;
    let limit = query_u64(&uri, "limit")?
        .map_or(DEFAULT_LIMIT, |n| usize::try_from(n).unwrap_or(usize::MAX));
    if !(1..=userconfig::MAX_HISTORY_PAGE).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let before = query_u64(&uri, "before")?;
    let found = app.storage().history_before(&id, before, limit).await?;
    let body = HistoryBody {
        versions: found.iter().map(|r| RevisionBody::new(&id, r)).collect(),
        user_id: id,
    };
    Ok(axum::Json(body).into_response())
}

/// The diff's query.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // a description for the OpenAPI document; `query_u64` reads it
pub(crate) struct DiffQuery {
    /// The version to compare from.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    from: u64,
    /// The version to compare to.
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    to: u64,
}

/// `GET /v1/users/{id}/config/diff?from=A&to=B`: the JSON Patch that turns version A's
/// configuration into B's.
#[utoipa::path(
    get,
    path = "/v1/users/{id}/config/diff",
    tag = "configuration",
    params(UserPath, DiffQuery),
    responses(
        (status = 200, description = "A JSON Patch (RFC 6902)", body = Vec<Object>, content_type = "application/json-patch+json"),
        (status = 404, description = "A version the history does not keep (`not_kept`)", body = ErrorBody),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn diff(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    userconfig::check_user_id(&id)?;
    let (Some(from), Some(to)) = (query_u64(&uri, "from")?, query_u64(&uri, "to")?) else {
        return Err(ApiError::bad_request("from and to are both needed"));
    };
    let patch = app
        .storage()
        .diff_user_config(&id, from, to)
        .await
        .map_err(not_kept)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json-patch+json")],
        serde_json::to_vec(&patch).expect("JSON values serialize"),
    )
        .into_response())
}

/// A rollback's body.
#[derive(ToSchema)]
#[allow(dead_code)] // a description for the OpenAPI document; `rollback_to` reads the body
pub(crate) struct RollbackBody {
    /// The version whose configuration to store again.
    #[schema(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    version: u64,
}

/// `POST /v1/users/{id}/config/rollback`.
#[utoipa::path(
    post,
    path = "/v1/users/{id}/config/rollback",
    tag = "configuration",
    params(UserPath, PreconditionHeaders),
    request_body(content = RollbackBody, description = "The version to roll back to"),
    responses(
        (status = 200, description = "Rolled back: the new version (also the `ETag`)", body = super::api::Stored, headers(("ETag" = String))),
        (status = 404, description = "A version the history does not keep (`not_kept`)", body = ErrorBody),
        (status = 412, description = "The stored version is not the one `If-Match` names (or a write landed meanwhile)", body = ErrorBody, headers(("ETag" = String))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn rollback(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    userconfig::check_user_id(&id)?;
    let preconditions = Preconditions::read(&headers)?;
    let to_version = rollback_to(&body)?;
    // The version it replaces: the one the preconditions pin, else the database's now,
    // checked against them (the compare-and-set then refuses a write that lands meanwhile).
    let expected = if preconditions.is_empty() {
        None
    } else if let Some(pinned) = preconditions.pinned() {
        Some(pinned)
    } else {
        let current = app.storage().load_user_config(&id).await?.version;
        if !preconditions.allow(current) {
            return Err(ApiError::precondition_failed(current));
        }
        Some(current)
    };
    let version = super::api::writer(&app, caller.as_ref())
        .rollback_user_config(&id, to_version, expected)
        .await
        .map_err(not_kept)?;
    let mut response = (
        StatusCode::OK,
        axum::Json(super::api::Stored::new(&id, version)),
    )
        .into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    Ok(response)
}

/// The version a rollback's body names: `{"version": N}` (other members are ignored), N a
/// whole number from 0 to 2^63 - 1 (`179.0` is 179, as JSON Schema's integers allow).
fn rollback_to(body: &[u8]) -> Result<u64, ApiError> {
    let refused =
        || ApiError::bad_request("the body must be {\"version\": N}, N from 0 to 2^63 - 1");
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| refused())?;
    let object = value.as_object().ok_or_else(refused)?;
    let number = object.get("version").ok_or_else(refused)?;
    let version = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9_007_199_254_740_992.0)
            .map(|f| f as u64)
    });
    version
        .filter(|v| i64::try_from(*v).is_ok())
        .ok_or_else(refused)
}

/// 404 `not_kept` for a version the history does not keep; the rest as usual.
pub(crate) fn not_kept(error: userconfig::Error) -> ApiError {
    match error {
        userconfig::Error::VersionNotKept { version } => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_kept",
            format!("version {version} of this configuration is not kept"),
        ),
        other => ApiError::from(other),
    }
}
