//! [`FaultProxy`]: a TCP proxy on tokio, placed between a client and Redis or PostgreSQL, whose
//! mode can be switched at any time: pass, latency, blackhole, reset, close after N bytes.
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! use tiercache_testkit::{FaultProxy, ProxyMode};
//!
//! let proxy = FaultProxy::start("127.0.0.1:6379").await;
//! let url = format!("redis://{}/", proxy.addr()); // give this to the client under test
//! proxy.set_mode(ProxyMode::Blackhole); // accepts, never answers
//! proxy.set_mode(ProxyMode::Latency(Duration::from_millis(20)));
//! proxy.set_mode(ProxyMode::Pass);
//! # let _ = url; }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forwards everything.
    Pass,
    /// Forwards everything, each chunk after this delay.
    Latency(Duration),
    /// Accepts connections and reads what they send, but never forwards or answers anything
    /// (a network partition, a hung server).
    Blackhole,
    /// Resets every connection, open and new (a crashed or restarted server).
    Reset,
    /// Forwards this many bytes in each direction of each connection, then closes it.
    CloseAfter(u64),
}

struct Shared {
    /// Where new connections go (a failover moves it).
    upstream: std::sync::Mutex<SocketAddr>,
    mode: watch::Sender<ProxyMode>,
    /// Bumped to kill every open connection.
    generation: watch::Sender<u64>,
    connections: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream())
            .field("mode", &*self.shared.mode.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    ///
    /// # Panics
    /// If `upstream` does not resolve or no port can be bound.
    pub async fn start(upstream: &str) -> Self {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("upstream resolves")
            .next()
            .expect("upstream has an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            upstream: std::sync::Mutex::new(upstream),
            mode: watch::channel(ProxyMode::Pass).0,
            generation: watch::channel(0).0,
            connections: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept(listener, Arc::clone(&shared)));
        FaultProxy { addr, shared, task }
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode, for open connections too.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.send_replace(mode);
    }

    /// Closes every open connection (new ones are accepted as the mode says).
    pub fn kill_connections(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Sends new connections to `upstream` (`host:port`) from now on (a failover: open
    /// connections stay where they are; kill them to move everyone).
    ///
    /// # Panics
    /// If `upstream` does not resolve.
    pub async fn set_upstream(&self, upstream: &str) {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("upstream resolves")
            .next()
            .expect("upstream has an address");
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream;
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn upstream(&self) -> SocketAddr {
        *self
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(client, Arc::clone(&shared)));
    }
}

/// Closes `stream` with a reset (RST) rather than a clean FIN. A zero linger does not block the
/// thread (only a positive one does, which is why tokio deprecates the setter).
#[allow(deprecated)]
fn reset(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let mut generation = shared.generation.subscribe();
    let mut mode = shared.mode.subscribe();
    // New connections in Blackhole or Reset mode never reach the server.
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Reset => {
                reset(&client);
                return;
            }
            ProxyMode::Blackhole => {
                tokio::select! {
                    _ = mode.changed() => continue,
                    _ = generation.changed() => return,
                }
            }
            _ => break,
        }
    }
    let Ok(server) = TcpStream::connect(shared.upstream()).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Arc::clone(&shared));
    let down = pump(server_read, client_write, Arc::clone(&shared));
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = generation.changed() => {}
    }
}

/// Copies one direction under the current mode. Returns when either side closes, the mode
/// says reset, or the byte budget is spent.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let mut mode = shared.mode.subscribe();
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => {
                if *mode.borrow() == ProxyMode::Reset {
                    return;
                }
                continue;
            }
        };
        let current = *mode.borrow();
        match current {
            ProxyMode::Pass => {}
            ProxyMode::Latency(d) => tokio::time::sleep(d).await,
            // Swallow the bytes; keep the connection open.
            ProxyMode::Blackhole => continue,
            ProxyMode::Reset => return,
            ProxyMode::CloseAfter(limit) => {
                let allowed = limit.saturating_sub(sent) as usize;
                if allowed == 0 {
                    return;
                }
                let n = n.min(allowed);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
                continue;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        sent += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        stream.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn modes_do_what_they_say() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(&echo.to_string()).await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut c, Duration::from_secs(2)).await.as_deref(),
            Some(&b"ping"[..])
        );

        proxy.set_mode(ProxyMode::Blackhole);
        assert_eq!(round_trip(&mut c, Duration::from_millis(100)).await, None);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut fresh, Duration::from_millis(100)).await,
            None
        );

        proxy.set_mode(ProxyMode::Reset);
        let mut d = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut d, Duration::from_millis(500)).await, None);

        proxy.set_mode(ProxyMode::CloseAfter(6));
        let mut e = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut e, Duration::from_secs(2)).await.is_some());
        assert!(
            round_trip(&mut e, Duration::from_millis(300))
                .await
                .is_none()
        );

        proxy.set_mode(ProxyMode::Latency(Duration::from_millis(10)));
        let mut f = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut f, Duration::from_secs(2)).await.is_some());

        proxy.set_mode(ProxyMode::Pass);
        proxy.kill_connections();
        let mut g = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut g, Duration::from_secs(2)).await.is_some());
        assert!(proxy.connections() >= 6);
    }
}
