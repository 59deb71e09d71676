//! The REST routes of one user's configuration, and readiness.
//!
//! Errors are JSON (`{"error": {"kind", "message"}}`), never repeating a configuration value:
//! 400 for bad input (raised before any I/O), 404 for a delete of nothing, 409 when a patch
//! lost to other writers too often, 412 for a compare-and-set that found another version
//! (with the current one as `ETag`), 503 with `Retry-After` while the database is unreachable.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use userconfig::{UserConfig, check_user_id};

use super::App;

/// An error response.
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    current: Option<u64>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_input",
            message: message.into(),
            current: None,
        }
    }
}

impl From<userconfig::Error> for ApiError {
    fn from(e: userconfig::Error) -> Self {
        let message = crate::explain(&e);
        let (status, kind) = if e.is_invalid_input() {
            (StatusCode::BAD_REQUEST, "invalid_input")
        } else if e.conflict().is_some() {
            (StatusCode::PRECONDITION_FAILED, "conflict")
        } else if matches!(e, userconfig::Error::TooManyConflicts { .. }) {
            (StatusCode::CONFLICT, "too_many_conflicts")
        } else if e.is_transient() {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        } else if e.is_read_only() {
            // A standby: this instance may serve reads, not writes.
            (StatusCode::SERVICE_UNAVAILABLE, "read_only")
        } else {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        };
        ApiError {
            status,
            kind,
            message,
            current: e.conflict(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "kind": self.kind, "message": self.message } });
        if let Some(current) = self.current {
            body["error"]["current_version"] = json!(current);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(current) = self.current {
            response.headers_mut().insert(header::ETAG, etag(current));
        }
        response
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

/// The version an `If-Match` header names (`"N"`, `W/"N"` or `N`); `None` without the header.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request("If-Match must be a version this service gave as ETag, as \"N\"")
        })
}

/// The user id, checked before any I/O.
fn user(id: &str) -> Result<(), ApiError> {
    check_user_id(id).map_err(ApiError::from)
}

fn stored(user_id: &str, version: u64, status: StatusCode) -> Response {
    let mut response = (
        status,
        axum::Json(json!({ "user_id": user_id, "version": version })),
    )
        .into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    response
}

/// `GET`: the configuration (the defaults if none is stored), `ETag` its version (`"0"`: none
/// stored), `X-Config-Stored` and `X-Served-By` (the tier that answered).
pub(crate) async fn get_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    user(&id)?;
    let began = Instant::now();
    let fetched = app.storage().fetch_user_config(&id).await?;
    app.window().record(fetched.answered_by, began.elapsed());
    let body = app.encoded.get(&id, &fetched.config);
    let mut response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(fetched.version));
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

/// `PUT`: stores the body (missing fields get defaults, unknown fields are kept).
pub(crate) async fn put_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    user(&id)?;
    let expected = if_match(&headers)?;
    let config: UserConfig = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a configuration: {e}")))?;
    let storage = app.storage();
    let version = match expected {
        Some(expected) => {
            storage
                .update_user_config_if(&id, expected, &config)
                .await?
        }
        None => storage.update_user_config(&id, &config).await?,
    };
    Ok(stored(&id, version, StatusCode::OK))
}

/// `PATCH`: applies a JSON merge patch (RFC 7386: `null` removes a field, objects merge,
/// anything else replaces) to the stored configuration, retrying on conflicting writers; with
/// `If-Match`, one attempt against that version.
pub(crate) async fn patch_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    user(&id)?;
    let expected = if_match(&headers)?;
    let patch: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "a merge patch of a configuration must be a JSON object",
        ));
    }
    let storage = app.storage();
    let apply = |config: &mut UserConfig| -> userconfig::Result<()> {
        let mut document = serde_json::to_value(&*config).expect("configs serialize");
        merge_patch(&mut document, &patch);
        *config = serde_json::from_value(document).map_err(|e| {
            userconfig::Error::InvalidConfig(format!("the patched configuration: {e}"))
        })?;
        Ok(())
    };
    let version = match expected {
        Some(expected) => {
            let current = storage.load_user_config(&id).await?;
            if current.version != expected {
                return Err(userconfig::Error::Conflict {
                    expected,
                    current: current.version,
                }
                .into());
            }
            let mut config = (*current.config).clone();
            apply(&mut config)?;
            storage
                .update_user_config_if(&id, expected, &config)
                .await?
        }
        None => storage.try_modify_user_config(&id, apply).await?,
    };
    Ok(stored(&id, version, StatusCode::OK))
}

/// RFC 7386's merge: `null` removes, objects merge member by member, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let object = target.as_object_mut().expect("made an object");
    for (name, value) in members {
        if value.is_null() {
            object.remove(name);
        } else {
            merge_patch(object.entry(name.clone()).or_insert(Value::Null), value);
        }
    }
}

/// `DELETE`: 200 with the delete's version, 404 if nothing was stored.
pub(crate) async fn delete_config(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    user(&id)?;
    let version = app.storage().delete_user_config(&id).await?;
    if version == 0 {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: "no configuration is stored for this user".into(),
            current: None,
        });
    }
    Ok(stored(&id, version, StatusCode::OK))
}

/// `GET /readyz`: 200 while the database answers (`degraded` if Redis does not), else 503.
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
    let mut body = json!({
        "status": state,
        "database": if database.is_ok() { "ok" } else { "down" },
        "redis": redis,
        "feed": feed,
    });
    if let Err(e) = &database {
        body["error"] = json!(crate::explain(e));
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

    /// RFC 7386, appendix A.
    #[test]
    fn merge_patch_follows_the_rfc_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut document = target.clone();
            merge_patch(&mut document, &patch);
            assert_eq!(document, expected, "{target} patched with {patch}");
        }
    }

    #[test]
    fn if_match_takes_the_etag_forms_and_refuses_others() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).ok().flatten(), None);
        for (value, expected) in [("\"7\"", 7), ("W/\"8\"", 8), ("9", 9)] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(value));
            assert_eq!(if_match(&h).ok().flatten(), Some(expected));
        }
        for bad in ["*", "\"x\"", "\"-1\""] {
            h.insert(header::IF_MATCH, HeaderValue::from_static(bad));
            assert!(if_match(&h).is_err(), "{bad}");
        }
    }
}
