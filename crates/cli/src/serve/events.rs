//! `GET /v1/users/{id}/config/events`: one user's configuration as Server-Sent Events, from a
//! watch of the storage (`userconfig::UserConfigStorage::watch`), with no polling.
//!
//! The first event is the configuration now, then one event per change: event `config`,
//! `id` the version, data `{"version", "stored", "config"}` (a delete is the defaults,
//! `stored: false`, at the delete's version). A client that reconnects with `Last-Event-ID`
//! (browsers do it by themselves) gets the configuration at once if it moved on meanwhile and
//! nothing otherwise: it misses no change, since each event is the whole configuration
//! (several changes in a burst may arrive as the last of them). A comment line every
//! `--stream-heartbeat` seconds keeps proxies from closing an idle stream and tells the server
//! of a client gone.
//!
//! Open streams are capped per instance (`--max-streams`) and per caller (`--max-streams-per-token`:
//! a service token's name, an end user's subject): past either, 503 `too_many_streams`. A
//! stream holds no request slot (`--max-in-flight` counts the handler only), and every stream
//! ends when the server shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use userconfig::{UserConfig, WatchedConfig};

use super::App;
use super::api::UserPath;
use super::auth::Caller;
use super::encoded::Encoded;
use super::error::{ApiError, ErrorBody, Refusals};

/// The open streams of one instance, and what ends them.
pub(crate) struct Streams {
    total: Arc<Semaphore>,
    max_total: usize,
    per_caller: Mutex<HashMap<String, usize>>,
    max_per_caller: usize,
    heartbeat: Duration,
    closing: watch::Sender<bool>,
}

impl Streams {
    pub(crate) fn new(max_total: usize, max_per_caller: usize, heartbeat: Duration) -> Arc<Self> {
        Arc::new(Streams {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            per_caller: Mutex::new(HashMap::new()),
            max_per_caller,
            heartbeat,
            closing: watch::Sender::new(false),
        })
    }

    /// Ends every stream open now and refuses new ones (the server is shutting down).
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// What ends the streams at a shutdown.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// The interval between heartbeats.
    pub(crate) fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Streams open now.
    pub(crate) fn open(&self) -> usize {
        self.max_total - self.total.available_permits()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.per_caller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for `caller`'s new stream (`None`: the service is open, and only the instance's
    /// cap applies), or 503.
    pub(crate) fn admit(self: &Arc<Self>, caller: Option<&str>) -> Result<Slot, ApiError> {
        let refused = |message: String| ApiError::busy("too_many_streams", message);
        let Ok(permit) = Arc::clone(&self.total).try_acquire_owned() else {
            return Err(refused(format!(
                "this instance holds {} streams, the most it may; retry after Retry-After",
                self.max_total
            )));
        };
        if let Some(caller) = caller {
            let mut counts = self.counts();
            let held = counts.entry(caller.to_owned()).or_default();
            if *held >= self.max_per_caller {
                return Err(refused(format!(
                    "this caller holds {} streams, the most one may",
                    self.max_per_caller
                )));
            }
            *held += 1;
        }
        Ok(Slot {
            streams: Arc::clone(self),
            caller: caller.map(str::to_owned),
            _permit: permit,
        })
    }
}

/// One open stream's place, given back when the stream ends (the client left, the server
/// shut down).
pub(crate) struct Slot {
    streams: Arc<Streams>,
    caller: Option<String>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(caller) = &self.caller else { return };
        let mut counts = self.streams.counts();
        if let Some(held) = counts.get_mut(caller) {
            *held -= 1;
            if *held == 0 {
                counts.remove(caller);
            }
        }
    }
}

/// An event's data.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ConfigEvent {
    /// The version (also the event's `id`): the stored configuration's, or the delete's.
    version: u64,
    /// Whether a configuration is stored (false: the defaults).
    stored: bool,
    /// The configuration.
    #[schema(value_type = UserConfig)]
    config: Arc<UserConfig>,
}

/// A `config` event (a [`ConfigEvent`]), the configuration encoded once for every stream of the
/// user (`encoded.rs`): a change sent to 10,000 streams is encoded once, not 10,000 times.
fn event(encoded: &Encoded, user: &str, watched: &WatchedConfig) -> Event {
    let config = encoded.get(user, &watched.config);
    let config = std::str::from_utf8(&config).expect("serde_json writes UTF-8");
    Event::default()
        .event("config")
        .id(watched.version.to_string())
        .data(format!(
            "{{\"version\":{},\"stored\":{},\"config\":{config}}}",
            watched.version, watched.stored
        ))
}

/// The `Last-Event-ID` a reconnecting client sends: the last version it has.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ApiError::bad_request("Last-Event-ID must be a version this stream sent (digits)")
    })
}

/// `GET /v1/users/{id}/config/events`.
#[utoipa::path(
    get,
    path = "/v1/users/{id}/config/events",
    tag = "configuration",
    params(
        UserPath,
        ("Last-Event-ID" = Option<String>, Header, pattern = r"^[ \t]*[0-9]{0,18}[ \t]*$", description = "The last version received: the stream starts with the configuration only if it moved on since"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `config` events (`id` the version, data a `ConfigEvent`), the configuration now first, then each change; a comment line as a heartbeat", body = ConfigEvent, content_type = "text/event-stream"),
        (status = 503, description = "Too many streams open on this instance or for this caller (`too_many_streams`), or the database unreachable", body = ErrorBody, headers(("Retry-After" = u64))),
        Refusals,
    ),
    security(("bearer" = [])),
)]
pub(crate) async fn config_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    userconfig::check_user_id(&id)?;
    let last = last_event_id(&headers)?;
    let streams = &app.streams;
    let mut closing = streams.closing.subscribe();
    if *closing.borrow_and_update() {
        return Err(ApiError::busy(
            "overloaded",
            "this instance is shutting down",
        ));
    }
    let caller = caller.map(|Extension(Caller(name))| name);
    let slot = streams.admit(caller.as_deref())?;
    let watch = app.storage().watch(&id).await.map_err(|e| match e {
        userconfig::Error::TooManyWatches { limit } => ApiError::busy(
            "too_many_streams",
            format!("this instance watches {limit} users, the most it may"),
        ),
        other => ApiError::from(other),
    })?;
    let now = watch.current();
    // A client that has this version (or, from an instance ahead of this one, a newer one)
    // gets nothing until the next change.
    let first = match last {
        Some(last) if last >= now.version => None,
        _ => Some(now.clone()),
    };
    // Each change is newer than the last; one this client has already is not sent again.
    let changes = watch
        .into_stream()
        .filter(move |w| std::future::ready(last.is_none_or(|last| w.version > last)));
    let shared = Arc::clone(&app);
    let events = futures_util::stream::iter(first)
        .chain(changes)
        .map(move |w| {
            // The stream owns its slot: given back when the client leaves.
            let _ = &slot;
            Ok::<_, Infallible>(event(&shared.encoded, &id, &w))
        })
        .take_until(async move {
            let _ = closing.wait_for(|closed| *closed).await;
        });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(streams.heartbeat))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx: pass each event on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_instance_and_per_caller_and_given_back() {
        let streams = Streams::new(3, 2, Duration::from_secs(15));
        let a1 = streams.admit(Some("a")).unwrap();
        let _a2 = streams.admit(Some("a")).unwrap();
        assert!(streams.admit(Some("a")).is_err(), "a third for one caller");
        let b1 = streams.admit(Some("b")).unwrap();
        assert!(
            streams.admit(Some("c")).is_err(),
            "a fourth for the instance"
        );
        assert_eq!(streams.open(), 3);
        drop(a1);
        assert_eq!(streams.open(), 2);
        let _a3 = streams.admit(Some("a")).unwrap();
        drop(b1);
        assert!(
            !streams.counts().contains_key("b"),
            "a caller with none is forgotten"
        );
        // An open service counts no caller: only the instance's cap.
        let open = Streams::new(3, 1, Duration::from_secs(15));
        let _held: Vec<_> = (0..3).map(|_| open.admit(None).unwrap()).collect();
        assert!(open.admit(None).is_err());
    }

    #[test]
    fn last_event_id_is_a_version() {
        let mut headers = HeaderMap::new();
        assert_eq!(last_event_id(&headers).unwrap(), None);
        headers.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(last_event_id(&headers).unwrap(), Some(42));
        headers.insert("last-event-id", HeaderValue::from_static("x"));
        assert!(last_event_id(&headers).is_err());
    }
}
