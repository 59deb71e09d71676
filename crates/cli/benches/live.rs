//! Live configuration, measured on the real servers in one run: how long after a write
//! through one instance a watch handle on another instance holds it, and an SSE client of
//! another instance receives it (p50/p99); and what 10,000 open event streams cost one
//! instance (memory per stream, and the time until a change reaches all of them).
//!
//! ```text
//! cargo bench -p userconfig-cli --bench live                 # 300 rounds, 10,000 streams
//! cargo bench -p userconfig-cli --bench live -- 1000 2000    # rounds, streams
//! ```
//!
//! A round: a random pause of up to 20 ms, then a write through instance A; the latency is
//! from before the call until the other side has the new version. B follows with the
//! backplane (Redis pub/sub carries the value) and the database's feed; C with the feed only.
//! The streams' clients run in a child process (this binary again), so that the server's
//! memory is its own and its file descriptors are one per stream.

use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_postgres::PostgresSource;
use tiercache_redis::RedisTier;
use tiercache_testkit::{env, postgres_env, redis_env};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use userconfig::{UserConfig, UserConfigStorage};

const USER: &str = "live";

fn percentiles(samples: Vec<Duration>) -> String {
    let samples = tiercache_testkit::Samples::new(samples);
    let at = |p: f64| samples.at(p);
    format!(
        "p50 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}  ({} rounds)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

fn themed(n: usize) -> UserConfig {
    let mut c = UserConfig::default_for(USER);
    c.preferences.theme = format!("t{n}");
    c
}

/// The resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The child: opens `n` event streams to `addr`, waits for each one's first event, says
/// `ready`, then reads every stream and says `got N` for each event it sees on all of them,
/// until its standard input closes.
async fn clients(addr: String, n: usize) {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut ready = Vec::new();
    for chunk in 0..n.div_ceil(500) {
        let mut opened = Vec::new();
        for _ in 0..500.min(n - chunk * 500) {
            let addr = addr.clone();
            let seen = seen_tx.clone();
            let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
            opened.push(first_rx);
            tokio::spawn(async move {
                let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let head =
                    format!("GET /v1/users/{USER}/config/events HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                socket.write_all(head.as_bytes()).await.unwrap();
                let mut lines = tokio::io::BufReader::new(socket).lines();
                let mut first = Some(first_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(id) = line.strip_prefix("id: ") {
                        match first.take() {
                            Some(first) => {
                                let _ = first.send(());
                            }
                            None => {
                                let _ = seen.send(id.trim().parse().unwrap());
                            }
                        }
                    }
                }
            });
        }
        ready.extend(opened);
        for first in std::mem::take(&mut ready) {
            first.await.expect("a stream's first event");
        }
    }
    println!("ready");
    // Count each version until every stream saw it.
    let mut counts = std::collections::HashMap::<u64, usize>::new();
    tokio::spawn(async {
        let mut line = String::new();
        let _ = tokio::io::BufReader::new(tokio::io::stdin())
            .read_line(&mut line)
            .await;
        std::process::exit(0);
    });
    while let Some(version) = seen_rx.recv().await {
        let count = counts.entry(version).or_default();
        *count += 1;
        if *count == n {
            println!("got {version}");
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if let Some(at) = std::env::args().position(|a| a == "--clients") {
        let rest: Vec<String> = std::env::args().skip(at + 1).collect();
        clients(rest[0].clone(), rest[1].parse().unwrap()).await;
        return;
    }
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let streams: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);

    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let redis = Arc::new(
        RedisTier::builder()
            .url(redis_env::redis_url().await)
            .prefix(redis_env::unique_prefix("bench_live"))
            .build()
            .unwrap(),
    );
    let postgres = Arc::new(
        PostgresSource::builder()
            .url(env::database_url())
            .schema(schema.clone())
            .build()
            .unwrap(),
    );
    let instance = |backplane: bool| {
        UserConfigStorage::builder()
            .redis_tier(redis.clone())
            .postgres_source(postgres.clone())
            .backplane(backplane)
            .build()
    };
    let (a, b, c) = (
        instance(true).await.unwrap(),
        instance(true).await.unwrap(),
        instance(false).await.unwrap(),
    );
    a.update_user_config(USER, &themed(0)).await.unwrap();
    let mut on_b = b.watch(USER).await.unwrap();
    let mut on_c = c.watch(USER).await.unwrap();

    // An SSE client of instance B, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sse_addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, userconfig_cli::router(b.clone())).into_future());
    let mut socket = tokio::net::TcpStream::connect(sse_addr).await.unwrap();
    socket
        .write_all(
            format!("GET /v1/users/{USER}/config/events HTTP/1.1\r\nHost: {sse_addr}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut sse = tokio::io::BufReader::new(socket).lines();
    let next_id =
        async |sse: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>| loop {
            let line = sse.next_line().await.unwrap().unwrap();
            if let Some(id) = line.strip_prefix("id: ") {
                return id.trim().parse::<u64>().unwrap();
            }
        };
    next_id(&mut sse).await;

    let (mut watch_b, mut watch_c, mut sse_b) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=rounds {
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..20_000))).await;
        let started = Instant::now();
        let version = a.update_user_config(USER, &themed(n)).await.unwrap();
        let (mut b_at, mut c_at, mut s_at) = (None, None, None);
        while b_at.is_none() || c_at.is_none() || s_at.is_none() {
            tokio::select! {
                got = on_b.changed(), if b_at.is_none() => {
                    if got.version >= version { b_at = Some(started.elapsed()); }
                }
                got = on_c.changed(), if c_at.is_none() => {
                    if got.version >= version { c_at = Some(started.elapsed()); }
                }
                id = next_id(&mut sse), if s_at.is_none() => {
                    if id >= version { s_at = Some(started.elapsed()); }
                }
            }
        }
        watch_b.push(b_at.unwrap());
        watch_c.push(c_at.unwrap());
        sse_b.push(s_at.unwrap());
    }
    println!("from a write through A's call until another instance has it:");
    println!(
        "  watch handle, backplane and feed   {}",
        percentiles(watch_b)
    );
    println!(
        "  watch handle, feed only            {}",
        percentiles(watch_c)
    );
    println!(
        "  SSE client, backplane and feed     {}",
        percentiles(sse_b)
    );

    // Many streams on one instance.
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let d = instance(true).await.unwrap();
    // A backlog for thousands of connections at once (`TcpListener::bind` asks for 128, and a
    // connection past it waits a second for its SYN to be retried).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let many_addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, userconfig_cli::router(d.clone())).into_future());
    // The router's first request starts what it keeps (its sampler, the watch): measured after.
    d.get_user_config(USER).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let opened = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--clients", &many_addr.to_string(), &streams.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(said.next().unwrap().unwrap(), "ready");
    let took = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    println!(
        "{streams} open streams on one instance: opened in {took:.2?}; resident memory {} MiB \
         -> {} MiB, {:.1} KiB a stream",
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / streams as f64
    );
    let mut fan_out = Vec::new();
    for n in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let version = a
            .update_user_config(USER, &themed(rounds + 1 + n))
            .await
            .unwrap();
        loop {
            let line = said.next().unwrap().unwrap();
            if line
                .strip_prefix("got ")
                .and_then(|v| v.parse::<u64>().ok())
                >= Some(version)
            {
                break;
            }
        }
        fan_out.push(started.elapsed());
    }
    println!(
        "  a write through A until all {streams} streams on D have it: {}",
        percentiles(fan_out)
    );
    let _ = child.stdin.take().unwrap().write_all(b"\n");
    let _ = child.wait();
    let _ = tiercache_core::CacheTier::clear(&*redis).await;
    postgres_env::drop_schema(&pool, &schema).await;
}
