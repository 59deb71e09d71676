//! Connections: the accept loop of `userconfig serve`, with the limits a connection has and a
//! shutdown that ends by a deadline.
//!
//! * Each connection is served by hyper's HTTP/1 with a timer, so `--header-timeout` bounds
//!   both the time to send a request's head and the idle time between requests (hyper starts
//!   it whenever the connection waits for a head): a client that sends half a head, or nothing,
//!   is closed. axum's own `serve` sets no timer, so this loop replaces it.
//! * At most `--max-connections` are open at once: one past it is answered a 503 with
//!   `Retry-After` and closed at once, so a crowd of slow clients never leaves the others
//!   waiting in the kernel's queue for a slot.
//! * Shutdown: the listener closes, every connection finishes the request it is on and closes
//!   (hyper's graceful shutdown); whatever is still open at `--shutdown-deadline` is dropped,
//!   so a stuck client cannot keep the process (and the flush that follows) waiting.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use super::limits::Limits;

/// What a connection past the cap is told before it is closed.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
    Content-Type: application/json\r\nContent-Length: 93\r\nConnection: close\r\n\r\n\
    {\"error\":{\"kind\":\"overloaded\",\"message\":\"this instance holds as many connections as it may\"}}";

/// The accept loop's counters, for `/metrics`.
#[derive(Default)]
pub(crate) struct Connections {
    /// Connections refused for the cap.
    pub(crate) refused: AtomicU64,
    /// Connections still open at the shutdown deadline, dropped.
    pub(crate) dropped: AtomicU64,
}

/// A listener on `addr` with a backlog of 4096 (the system's cap may lower it): tokio's
/// `bind` asks for 128, and a burst of connections past that waits a second each for the
/// client's retried handshake.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves `app` on `listener` until `stop` resolves, then shuts down by the deadline.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    counters: Arc<Connections>,
    stop: impl Future<Output = ()>,
) {
    let cap = limits
        .max_connections
        .unwrap_or_else(super::limits::auto_connections);
    tracing::debug!(max_connections = cap, "accepting");
    let slots = Arc::new(Semaphore::new(cap));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut connections = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut stop => break,
            // Reap finished connections as they end, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was taken:
                    // wait a moment rather than spin, and go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            refuse(stream, &refusing);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|request: hyper::Request<Incoming>| request.map(Body::new)),
        );
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            // A client that goes away or breaks the protocol ends only its own connection.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        open = connections.len(),
        deadline_secs = limits.shutdown_deadline.as_secs_f64(),
        "closing connections: requests in flight finish"
    );
    if tokio::time::timeout(limits.shutdown_deadline, graceful.shutdown())
        .await
        .is_err()
    {
        let left = connections.len();
        counters.dropped.fetch_add(left as u64, Ordering::Relaxed);
        tracing::warn!(
            connections = left,
            "the shutdown deadline passed: closing the connections still open"
        );
    }
    connections.shutdown().await;
}

/// Tells a connection past the cap to come back: the answer, then the end of what the client
/// sent is read (for a second at most) so the close is orderly and the client gets to read the
/// answer (closing on unread bytes would reset the connection and lose it). At most
/// `REFUSING` are told at once; past that, a connection is closed without a word.
fn refuse(stream: TcpStream, refusing: &Arc<Semaphore>) {
    let Ok(permit) = Arc::clone(refusing).try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let told = async {
            stream.write_all(FULL).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), told).await;
        drop(permit);
    });
}

/// Refusals under way at once, at most.
const REFUSING: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_one_whole_response() {
        let text = std::str::from_utf8(FULL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["kind"], "overloaded");
    }
}
