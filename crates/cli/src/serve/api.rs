//! The REST routes of one user's configuration, and readiness.
//!
//! Errors are `error.rs`'s JSON: 400 for bad input (raised before any I/O), 404 for a delete
//! of nothing, 409 when a change lost to other writers too often, 412 for a precondition the
//! stored version does not meet (with the current one as `ETag`; `conditional.rs`), 503 with
//! `Retry-After` while the database is unreachable.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use userconfig::{UserConfig, UserConfigStorage, check_user_id};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use super::App;
use super::auth::Caller;
use super::change::{Change, Done, change};
use super::conditional::{PreconditionHeaders, Preconditions, Verdict};
use super::error::{ApiError, ErrorBody, Refusals};
use super::history::{not_kept, query_flag, query_u64};

pub(crate) fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// The storage a change goes through: with a credential, one that names its holder as the
/// change's author in the history (the token's name, or `user:` and the end user's subject).
pub(crate) fn writer(app: &App, caller: Option<&Extension<Caller>>) -> UserConfigStorage {
    match caller {
        Some(Extension(Caller(name))) => app.storage().by(name),
        None => app.storage().clone(),
    }
}

/// The user id, checked before any I/O.
fn user(id: &str) -> Result<(), ApiError> {
    check_user_id(id).map_err(ApiError::from)
}

/// The user a configuration route is about.
#[derive(IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
#[allow(dead_code)] // a description of the path for the OpenAPI document; `Path<String>` reads it
pub(crate) struct UserPath(
    /// The user id: 1 to 256 bytes, no control characters.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    String,
);

/// A change's body.
#[derive(Serialize, ToSchema)]
pub(crate) struct Stored {
    /// The user.
    user_id: String,
    /// The version stored now (also the `ETag`); a delete's own version for a delete.
    version: u64,
}

impl Stored {
    pub(crate) fn new(user_id: &str, version: u64) -> Self {
        Stored {
            user_id: user_id.to_owned(),
            version,
        }
    }
}

/// What a `PUT` or a `PATCH` answers besides the refusals.
#[derive(IntoResponses)]
#[allow(dead_code)] // a description of responses for the OpenAPI document, never built
pub(crate) enum Changed {
    /// Stored (`ETag`: its version).
    #[response(status = 200, headers(("ETag" = String)))]
    Stored(Stored),
    /// Created: none was stored (`ETag`: its version).
    #[response(status = 201, headers(("ETag" = String)))]
    Created(Stored),
    /// Lost to other writers too often.
    #[response(status = 409)]
    Conflicts(ErrorBody),
    /// The stored version (the `ETag`) does not meet the preconditions.
    #[response(status = 412, headers(("ETag" = String)))]
    PreconditionFailed(ErrorBody),
}

/// `/readyz`'s body.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ready`, `degraded` (Redis or the change feed down: still serving) or `unready`.
    status: &'static str,
    /// `ok` or `down`.
    database: &'static str,
    /// `ok`, `down` or `none` (no Redis tier).
    redis: &'static str,
    /// `ok`, `down` or `none` (no change feed).
    feed: &'static str,
}

/// A change's answer: 201 if it created the configuration, else 200; `ETag` its version.
fn stored(user_id: &str, done: Done) -> Response {
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = Stored {
        user_id: user_id.to_owned(),
        version: done.version,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::ETAG, etag(done.version));
    response
}

/// A configuration's caching rules for a browser or a proxy: this user's only, and asked
/// again (with `If-None-Match`) before each use.
const CONFIG_CACHE_CONTROL: HeaderValue = HeaderValue::from_static("private, no-cache");

/// `GET`: the configuration (the defaults if none is stored), `ETag` its version (`"0"`: none
/// stored), `X-Config-Stored` and `X-Served-By` (the tier that answered); 304 for an
/// `If-None-Match` that names it, 412 for an `If-Match` that does not. `X-Min-Version: N`:
/// version N or newer, from the database if this instance's caches are behind (read your
/// writes through any instance). `?version=N`: that past version, from the history.
#[utoipa::path(
    get,
    path = "/v1/users/{id}/config",
    tag = "configuration",
    params(
        UserPath,
        PreconditionHeaders,
        ("X-Min-Version" = Option<String>, Header, pattern = r"^[ \t]*[0-9]{1,18}[ \t]*$", description = "Answer with this version or a newer one: a version this client wrote through another instance"),
        ("version" = Option<u64>, Query, maximum = 9_223_372_036_854_775_807_i64, description = "A past version, from the history (404 `not_kept` if it is not kept)"),
    ),
    responses(
        (status = 200, description = "The configuration (the defaults if none is stored)", body = UserConfig, headers(("ETag" = String, description = "The version, `\"0\"` if none is stored"), ("X-Config-Stored" = String), ("X-Served-By" = String), ("Cache-Control" = String))),
        (status = 304, description = "`If-None-Match` names the stored version", headers(("ETag" = String))),
        (status = 404, description = "`?version=N` names a version the history does not keep (`not_kept`)", body = ErrorBody),
        (status = 412, description = "`If-Match` does not name the stored version", body = ErrorBody, headers(("ETag" = String))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn get_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    user(&id)?;
    let preconditions = Preconditions::read(&headers)?;
    if let Some(version) = query_u64(&uri, "version")? {
        return past(&app, &id, version).await;
    }
    let min = min_version(&headers)?;
    let began = Instant::now();
    let fetched = match min {
        Some(min) => app.storage().fetch_user_config_at_least(&id, min).await?,
        None => app.storage().fetch_user_config(&id).await?,
    };
    app.window().record(fetched.answered_by, began.elapsed());
    let mut response = match preconditions.verdict(fetched.version, true) {
        Verdict::Failed => return Err(ApiError::precondition_failed(fetched.version)),
        Verdict::NotModified => StatusCode::NOT_MODIFIED.into_response(),
        Verdict::Proceed => {
            let body = app.encoded.get(&id, &fetched.config);
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(fetched.version));
    headers.insert(header::CACHE_CONTROL, CONFIG_CACHE_CONTROL);
    headers.insert(
        "x-config-stored",
        HeaderValue::from_static(if fetched.stored { "true" } else { "false" }),
    );
    headers.insert(
        "x-served-by",
        HeaderValue::from_static(fetched.answered_by.as_str()),
    );
    Ok(response)
}

/// `X-Min-Version`, if sent: a version number.
fn min_version(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    headers
        .get("x-min-version")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| ApiError::bad_request("X-Min-Version must be a version (digits)"))
        })
        .transpose()
}

/// A past version of the configuration, from the history.
async fn past(app: &App, id: &str, version: u64) -> Result<Response, ApiError> {
    let revision = app
        .storage()
        .get_user_config_at(id, version)
        .await?
        .ok_or_else(|| not_kept(userconfig::Error::VersionNotKept { version }))?;
    let config = revision.config_or_defaults(id);
    let mut response = axum::Json(&*config).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(revision.version));
    headers.insert(header::CACHE_CONTROL, CONFIG_CACHE_CONTROL);
    headers.insert(
        "x-config-stored",
        HeaderValue::from_static(if revision.config.is_some() {
            "true"
        } else {
            "false"
        }),
    );
    Ok(response)
}

/// `PUT`: stores the body (missing fields get defaults, unknown fields are kept); 201 if no
/// configuration was stored.
#[utoipa::path(
    put,
    path = "/v1/users/{id}/config",
    tag = "configuration",
    params(UserPath, PreconditionHeaders),
    request_body(content = UserConfig, description = "The configuration: missing fields get defaults, unknown fields are kept"),
    responses(
        Changed,
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn put_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    user(&id)?;
    let preconditions = Preconditions::read(&headers)?;
    let config: UserConfig = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a configuration: {e}")))?;
    app.storage().check_user_config(&id, &config)?;
    let done = change(
        &writer(&app, caller.as_ref()),
        &id,
        &preconditions,
        &Change::Put(Box::new(config)),
    )
    .await?;
    Ok(stored(&id, done))
}

/// `PATCH`: applies a JSON merge patch (RFC 7386: `null` removes a field, objects merge,
/// anything else replaces) to the stored configuration (the defaults if none is: 201),
/// retrying on conflicting writers as long as the preconditions still hold.
#[utoipa::path(
    patch,
    path = "/v1/users/{id}/config",
    tag = "configuration",
    params(UserPath, PreconditionHeaders),
    request_body(content = Object, content_type = "application/merge-patch+json", description = "A JSON merge patch (RFC 7386): `null` removes a field"),
    responses(
        Changed,
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn patch_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    user(&id)?;
    let preconditions = Preconditions::read(&headers)?;
    let patch: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "a merge patch of a configuration must be a JSON object",
        ));
    }
    let storage = writer(&app, caller.as_ref());
    let done = change(&storage, &id, &preconditions, &Change::Patch(patch)).await?;
    Ok(stored(&id, done))
}

/// `DELETE`: 200 with the delete's version, 404 if nothing was stored; with preconditions, a
/// compare-and-set that deletes only what they name.
#[utoipa::path(
    delete,
    path = "/v1/users/{id}/config",
    tag = "configuration",
    params(
        UserPath,
        PreconditionHeaders,
        ("purge_history" = Option<bool>, Query, description = "Also remove every past version (deletion for privacy): 200 even when nothing was stored"),
    ),
    responses(
        (status = 200, description = "Deleted; the delete's version", body = Stored, headers(("ETag" = String))),
        (status = 404, description = "No configuration is stored", body = ErrorBody),
        (status = 409, description = "Lost to other writers too often", body = ErrorBody),
        (status = 412, description = "The stored version does not meet the preconditions", body = ErrorBody, headers(("ETag" = String))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn delete_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    user(&id)?;
    let preconditions = Preconditions::read(&headers)?;
    let storage = &writer(&app, caller.as_ref());
    let purge = query_flag(&uri, "purge_history")?;
    let done = if preconditions.is_empty() {
        Done {
            version: storage.delete_user_config(&id).await?,
            created: false,
        }
    } else {
        change(storage, &id, &preconditions, &Change::Delete).await?
    };
    if purge {
        // After the delete (which the preconditions allowed): every past version goes too.
        // Nothing stored is no 404 here: the history may still have held the user.
        storage.purge_history(&id).await?;
        return Ok(stored(&id, done));
    }
    if done.version == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no configuration is stored for this user",
        ));
    }
    Ok(stored(&id, done))
}

/// `GET /readyz`: 200 while the database answers (`degraded` if Redis does not), else 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready (or degraded: serving without Redis or the change feed)", body = Readiness),
        (status = 503, description = "Unready: the database does not answer", body = Readiness, headers(("Retry-After" = u64))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn ready(State(app): State<Arc<App>>) -> Response {
    let storage = app.storage();
    let database = storage.ping_database().await;
    let redis = match storage.redis() {
        None => "none",
        Some(r) if r.ping().await.is_ok() => "ok",
        Some(_) => "down",
    };
    // While the change feed is down, changes by other writers are not applied (they are once
    // it is back, or every cache is flushed): served, but perhaps stale.
    let feed = match storage.get_cache_stats().chain.feed {
        None => "none",
        Some(f) if f.connected => "ok",
        Some(_) => "down",
    };
    let (status, state) = readiness(database.is_ok(), redis, feed);
    let body = Readiness {
        status: state,
        database: if database.is_ok() { "ok" } else { "down" },
        redis,
        feed,
    };
    if let Err(e) = &database {
        // The cause (which may name hosts and tables) for the operator, not the prober.
        let id = super::observe::request_id();
        tracing::warn!(
            request_id = id.as_deref().unwrap_or("-"),
            "not ready: the database does not answer: {}",
            crate::explain(e)
        );
    }
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The status and the word `/readyz` answers with: unready without the database; degraded
/// (still ready: the chain serves without them) with Redis down or the change feed cut off.
fn readiness(database: bool, redis: &str, feed: &str) -> (StatusCode, &'static str) {
    match (database, redis, feed) {
        (false, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "unready"),
        (true, "down", _) | (true, _, "down") => (StatusCode::OK, "degraded"),
        (true, _, _) => (StatusCode::OK, "ready"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_degraded_while_redis_or_the_feed_is_down() {
        let ready = (StatusCode::OK, "ready");
        let degraded = (StatusCode::OK, "degraded");
        assert_eq!(readiness(true, "ok", "ok"), ready);
        assert_eq!(readiness(true, "none", "none"), ready);
        assert_eq!(readiness(true, "down", "ok"), degraded);
        assert_eq!(readiness(true, "ok", "down"), degraded);
        assert_eq!(readiness(true, "none", "down"), degraded);
        assert_eq!(readiness(false, "ok", "ok").1, "unready");
    }
}
