//! `GET /v1/changes?since=CURSOR`: every change this instance learns of (any user, any
//! writer), as Server-Sent Events, for services that keep their own copies: event `change`,
//! `id` its cursor, data `{"user_id", "version", "op"}` (`write` or `delete`); event `resync`
//! when changes may have been missed (read every user you keep again). `since` (or a
//! reconnecting browser's `Last-Event-ID`) resumes right after that change; a cursor this
//! instance can no longer resume from (another instance's, from before a restart, or older
//! than the last 65,536 changes) is 410 `resync`. Needs the `read` scope of a service token;
//! end users' tokens are refused (the stream names every user).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use userconfig::{ChangeOp, LoggedChange};

use super::App;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody, Refusals};

/// An event's data.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ChangeEvent {
    /// The user (empty for `resync`).
    user_id: String,
    /// The change's version.
    version: u64,
    /// `write`, `delete` or `resync`.
    op: &'static str,
}

fn event(change: &LoggedChange) -> Event {
    let op = match change.op {
        ChangeOp::Write => "write",
        ChangeOp::Delete => "delete",
        _ => "resync",
    };
    let kind = if op == "resync" { "resync" } else { "change" };
    Event::default()
        .event(kind)
        .id(change.cursor.clone())
        .json_data(ChangeEvent {
            user_id: change.user_id.clone(),
            version: change.version,
            op,
        })
        .expect("a change serializes")
}

/// The cursor to resume from: `since`, else `Last-Event-ID`.
fn since(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "since")
            .map(|(_, v)| v.to_owned())
    });
    from_query
        .or_else(|| {
            headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .filter(|c| !c.trim().is_empty())
}

/// `GET /v1/changes`.
#[utoipa::path(
    get,
    path = "/v1/changes",
    tag = "configuration",
    params(
        ("since" = Option<String>, Query, description = "A cursor (an event's id) to resume right after"),
        ("Last-Event-ID" = Option<String>, Header, description = "As `since`, from a reconnecting browser"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `change` (id the cursor, data a `ChangeEvent`), `resync` when changes may have been missed", body = ChangeEvent, content_type = "text/event-stream"),
        (status = 410, description = "The cursor can no longer be resumed from (`resync`): read every user you keep again, then follow without `since`", body = ErrorBody),
        (status = 503, description = "Too many streams open (`too_many_streams`)", body = ErrorBody, headers(("Retry-After" = u64))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn changes(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cursor = since(&uri, &headers);
    let streams = &app.streams;
    let slot = streams.admit(caller.as_ref().map(|Extension(Caller(name))| name.as_str()))?;
    let mut closing = streams.closing();
    let reader = app
        .storage()
        .changes(cursor.as_deref())
        .map_err(|e| match e {
            userconfig::Error::CursorTooOld => ApiError::new(
                StatusCode::GONE,
                "resync",
                "this cursor can no longer be resumed from: read every user you keep again, \
                 then follow without since",
            ),
            other => ApiError::from(other),
        })?;
    let events = futures_util::stream::unfold(
        (reader, slot, false),
        |(mut reader, slot, done)| async move {
            if done {
                return None;
            }
            match reader.next().await {
                Ok(change) => Some((Ok::<_, Infallible>(event(&change)), (reader, slot, false))),
                // Fell a whole log behind: say so, and end.
                Err(_) => {
                    let resync = Event::default()
                        .event("resync")
                        .data(r#"{"op":"resync","reason":"fell behind the change log"}"#);
                    Some((Ok(resync), (reader, slot, true)))
                }
            }
        },
    );
    let events = futures_util::StreamExt::take_until(events, async move {
        let _ = closing.wait_for(|closed| *closed).await;
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(streams.heartbeat()))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
