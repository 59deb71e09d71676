//! `userconfig serve`: the storage over HTTP, its statistics, Prometheus metrics, health
//! checks and the live dashboard.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/users/{id}/config` | the configuration (defaults if none is stored); `ETag` is its version; 304 for `If-None-Match` |
//! | `PUT /v1/users/{id}/config` | store it (201 if none was); `If-Match` / `If-None-Match` make it a compare-and-set (else 412) |
//! | `PATCH /v1/users/{id}/config` | a JSON merge patch (RFC 7386), retried on conflicts while the preconditions hold |
//! | `DELETE /v1/users/{id}/config` | delete it (404 if none is stored); `If-Match` deletes only that version |
//! | `GET /v1/users/{id}/config/events` | Server-Sent Events: the configuration, then each change (`events.rs`) |
//! | `GET /v1/users/{id}/config/history`, `…/diff`, `POST …/rollback` | past versions, a JSON Patch between two, rollback (`history.rs`) |
//! | `GET /v1/changes?since=CURSOR` | Server-Sent Events: every change (user, version, op), resumable (`changes.rs`) |
//! | `GET /stats` | the seed's statistics JSON (an array with several instances) |
//! | `GET /metrics` | Prometheus text, rendered from the live statistics at each scrape |
//! | `GET /healthz` | the process answers |
//! | `GET /readyz` | the database answers (Redis or the change feed down is `degraded`, still ready) |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of these routes (`openapi.rs`) |
//! | `GET /` | the live dashboard (`GET /dashboard/data`: its figures) |
//!
//! Who may use which route: `auth.rs` (service tokens with scopes). With no tokens `serve`
//! runs open, and only on a loopback address unless told `--insecure-no-auth`.

mod api;
pub(crate) mod auth;
mod change;
mod changes;
mod conditional;
mod dashboard;
mod encoded;
mod error;
mod events;
mod history;
pub(crate) mod jwt;
pub(crate) mod limits;
mod listen;
mod observe;
mod openapi;
mod prometheus;
mod rate;
pub(crate) mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use tokio::sync::oneshot;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use userconfig::UserConfigStorage;

pub(crate) use dashboard::Board;
use window::Window;

use crate::{Connection, Failure};

/// Options of `userconfig serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// The service tokens (one a line: `name scopes sha256`; `userconfig token` makes one).
    /// Without tokens the service is open to whoever reaches it, so it listens only on a
    /// loopback address.
    #[arg(long, value_name = "PATH", env = "USERCONFIG_TOKENS_FILE")]
    tokens_file: Option<std::path::PathBuf>,
    /// Serve with no tokens on an address other machines may reach: anyone who reaches it may
    /// read, change and delete every configuration.
    #[arg(long)]
    insecure_no_auth: bool,
    #[command(flatten)]
    jwt: jwt::JwtArgs,
    #[command(flatten)]
    limits: limits::Limits,
}

impl ServeArgs {
    /// Who may use the service, or why it must not start: with no tokens, only a loopback
    /// address (or `--insecure-no-auth`), as Redis's protected mode.
    fn access(&self) -> Result<auth::Access, Failure> {
        let mut access = auth::Access::open();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Failure::usage(format!(
                    "cannot read the tokens file {}: {e}",
                    path.display()
                ))
            })?;
            let tokens = auth::Tokens::parse(&text)
                .map_err(|e| Failure::usage(format!("the tokens file {}: {e}", path.display())))?;
            access.tokens = Some(tokens.limit_rate(self.limits.rate_per_token));
        }
        access.jwt = jwt::Jwt::load(&self.jwt).map_err(Failure::usage)?;
        if access.is_open() {
            return open_on(self.listen, self.insecure_no_auth);
        }
        Ok(access)
    }
}

/// No tokens: open, on a loopback address (said at warn), or elsewhere only when told.
pub(crate) fn open_on(listen: SocketAddr, insecure: bool) -> Result<auth::Access, Failure> {
    if listen.ip().is_loopback() {
        tracing::warn!(%listen, "no tokens (--tokens-file, --jwt-secret-file, --jwks-file): \
            anyone on this machine may read and change every configuration");
    } else if insecure {
        tracing::warn!(%listen, "--insecure-no-auth: anyone who reaches this address may read, \
            change and delete every configuration");
    } else {
        return Err(Failure::usage(format!(
            "refusing to serve on {listen} with no tokens: anyone reaching it could read and \
             change every configuration. Give --tokens-file (docs/security.md), listen on a \
             loopback address, or pass --insecure-no-auth"
        )));
    }
    Ok(auth::Access::open())
}

/// What the handlers share.
pub(crate) struct App {
    pub(crate) board: Arc<Board>,
    /// The JSON of the configurations `GET` served, while the chain's copy lives.
    pub(crate) encoded: encoded::Encoded,
    /// Requests by route template, method and status, for `/metrics`.
    requests: Arc<observe::Requests>,
    /// The accept loop's counters (zero for a router served by someone else).
    connections: Arc<listen::Connections>,
    /// The open event streams (`events.rs`).
    streams: Arc<events::Streams>,
}

impl App {
    /// The storage the REST routes use (the first instance).
    pub(crate) fn storage(&self) -> &UserConfigStorage {
        &self.board.storages()[0]
    }

    pub(crate) fn window(&self) -> &Window {
        &self.board.window
    }
}

/// The routes over `storages`, with a sampler that runs as long as the router lives.
pub(crate) fn router_for(
    storages: Vec<UserConfigStorage>,
    max_body_bytes: usize,
    access: auth::Access,
) -> Router {
    let board = Board::new(storages, Arc::new(Window::default()));
    dashboard::spawn_sampler(&board);
    let limits = limits::Limits::default();
    let streams = events::Streams::new(
        limits.max_streams,
        limits.max_streams_per_token,
        limits.stream_heartbeat,
    );
    router(
        board,
        max_body_bytes,
        Arc::new(access),
        &limits,
        Arc::default(),
        streams,
    )
}

/// The routes over `board`'s storages (the first serves the REST routes; all are on the
/// dashboard).
///
/// Layers, from the outside in: the request id, count and access log (`observe.rs`); the
/// request limits (in flight, timeout) for every route but `/healthz` and the page; who asks
/// (`auth.rs`); the body limit; the handler.
pub(crate) fn router(
    board: Arc<Board>,
    max_body_bytes: usize,
    access: Arc<auth::Access>,
    limits: &limits::Limits,
    connections: Arc<listen::Connections>,
    streams: Arc<events::Streams>,
) -> Router {
    let capacity = board.storages()[0].get_cache_stats().memory_cache.max_size;
    let requests = Arc::new(observe::Requests::default());
    let app = Arc::new(App {
        board,
        encoded: encoded::Encoded::new(usize::try_from(capacity).unwrap_or(usize::MAX)),
        requests: Arc::clone(&requests),
        connections,
        streams,
    });
    Router::new()
        .route(
            "/v1/users/{id}/config",
            get(api::get_config)
                .put(api::put_config)
                .patch(api::patch_config)
                .delete(api::delete_config),
        )
        .route("/v1/users/{id}/config/events", get(events::config_events))
        .route("/v1/changes", get(changes::changes))
        .route("/v1/users/{id}/config/history", get(history::history))
        .route("/v1/users/{id}/config/diff", get(history::diff))
        .route(
            "/v1/users/{id}/config/rollback",
            axum::routing::post(history::rollback),
        )
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/readyz", get(api::ready))
        .route("/dashboard/data", get(dashboard_data))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        // Before any handler, so before any cache or database.
        .layer(middleware::from_fn_with_state(access, auth::check))
        // One semaphore for every route (a global limit: `Router::layer` clones the layer
        // per route), shed rather than queued.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(limits::refused))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(limits.max_in_flight))
                .timeout(limits.request_timeout),
        )
        // Open, and never shed: a liveness probe must not fail for load.
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::document))
        .route("/", get(|| async { Html(dashboard::PAGE) }))
        .layer(middleware::from_fn_with_state(requests, observe::observe))
        .with_state(app)
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", body = String, content_type = "text/plain")),
)]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(
    get,
    path = "/stats",
    tag = "operations",
    responses(
        (status = 200, description = "The statistics of the seed design (`get_cache_stats`), an array with several instances", body = Object),
        error::Refusals,
    ),
    security(("bearer" = [])),
)]
async fn stats(State(app): State<Arc<App>>) -> Response {
    let storages = app.board.storages();
    let body = if storages.len() == 1 {
        serde_json::to_vec_pretty(&storages[0].get_cache_stats())
    } else {
        serde_json::to_vec_pretty(
            &storages
                .iter()
                .map(UserConfigStorage::get_cache_stats)
                .collect::<Vec<_>>(),
        )
    }
    .expect("stats serialize");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text", body = String, content_type = "text/plain"),
        error::Refusals,
    ),
    security(("bearer" = [])),
)]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let stats: Vec<_> = app
        .board
        .storages()
        .iter()
        .map(UserConfigStorage::get_cache_stats)
        .collect();
    let http = app.requests.counts();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        prometheus::render(&stats, &http, &app.connections, app.streams.open()),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/dashboard/data",
    tag = "operations",
    responses(
        (status = 200, description = "The live dashboard's figures", body = Object),
        error::Refusals,
    ),
    security(("bearer" = [])),
)]
async fn dashboard_data(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(app.board.data()),
    )
        .into_response()
}

/// A running server: its address, and what stops it.
pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// Ended first at a shutdown: an event stream never finishes by itself.
    streams: Arc<events::Streams>,
    task: tokio::task::JoinHandle<()>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (until the shutdown deadline: then the
    /// connections still open are closed), and returns once the server is done.
    pub(crate) async fn stop(mut self) -> Result<(), Failure> {
        self.streams.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.sampler.abort();
        (&mut self.task)
            .await
            .map_err(|e| Failure::new(format!("the server task failed: {e}")))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sampler.abort();
        self.streams.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `storages` on `listen` until [`Running::stop`]; `window` is what the callers record
/// latencies into (the REST routes do too).
pub(crate) async fn start(
    listen: SocketAddr,
    storages: Vec<UserConfigStorage>,
    window: Arc<Window>,
    max_body_bytes: usize,
    access: auth::Access,
    limits: limits::Limits,
) -> Result<Running, Failure> {
    let listener = listen::bind(listen)
        .map_err(|e| Failure::unavailable(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::new(format!("cannot read the listening address: {e}")))?;
    let board = Board::new(storages, window);
    let sampler = dashboard::spawn_sampler(&board);
    let connections = Arc::new(listen::Connections::default());
    let streams = events::Streams::new(
        limits.max_streams,
        limits.max_streams_per_token,
        limits.stream_heartbeat,
    );
    let app = router(
        board,
        max_body_bytes,
        Arc::new(access),
        &limits,
        Arc::clone(&connections),
        Arc::clone(&streams),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(listen::serve(
        listener,
        app,
        limits,
        connections,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Running {
        addr,
        stop: Some(stop),
        streams,
        task,
        sampler,
    })
}

/// `userconfig serve`: until SIGTERM or Ctrl-C, then in-flight requests finish, what the
/// storage has pending is flushed, and the process exits 0.
pub(crate) async fn run(
    args: ServeArgs,
    connection: Connection,
    json: bool,
    within: Duration,
) -> Result<(), Failure> {
    // Before anything connects: a service that must not start touches nothing.
    let access = args.access()?;
    let storage = connection.storage().await?;
    let running = start(
        args.listen,
        vec![storage.clone()],
        Arc::new(Window::default()),
        args.max_body_bytes,
        access,
        args.limits,
    )
    .await?;
    // The one line on stdout: where to connect (tests and scripts read it).
    if json {
        println!(
            "{}",
            serde_json::json!({ "listening": format!("http://{}", running.addr) })
        );
    } else {
        println!("listening on http://{}", running.addr);
    }
    tracing::info!(addr = %running.addr, "serving");
    crate::stop_signal().await;
    running.stop().await?;
    crate::finish(&storage, "served", within).await?;
    eprintln!("stopped");
    Ok(())
}
