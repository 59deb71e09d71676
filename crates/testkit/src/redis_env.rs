//! Tests against a real Redis: a client for `REDIS_URL` (checked with a PING) and key prefixes
//! that keep parallel tests apart.
//!
//! ```no_run
//! # async fn demo() {
//! use tiercache_testkit::redis_env;
//!
//! let client = redis_env::redis_client().await; // panics, naming REDIS_URL, if unreachable
//! let prefix = redis_env::unique_prefix("my test"); // "tc_my_test_<pid>_<n>_<t>:"
//! # let _ = (client, prefix); }
//! ```

use crate::env;

/// The `host:port` of a `redis://host:port/` URL (for a [`FaultProxy`](crate::FaultProxy) in
/// front of it).
#[must_use]
pub fn host_of(url: &str) -> String {
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string()
}

/// Whether `redis-server` can be run. If not, says loudly on standard error that the test is
/// skipped (`so`: what cannot be done), or, with `CI` set, fails.
fn redis_server_installed(so: &str) -> bool {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed, and CI is set: install it (apt-get install redis-server)"
        );
        // Written to the stderr handle itself, not with `eprintln!`, which the test harness
        // captures (and shows only for a failing test): a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: redis-server is not installed, so {so}. Install it \
             (apt-get install redis-server) to run it. ***\n"
        );
    }
    found
}

/// A client for [`env::redis_url`], after a successful PING.
///
/// # Panics
/// If Redis cannot be reached, with a message naming `REDIS_URL` and the command that starts
/// the local server.
pub async fn redis_client() -> redis::Client {
    let url = env::redis_url();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "{}",
            env::unreachable("Redis", env::REDIS_URL_VAR, env::REDIS_START, e)
        )
    };
    let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| fail(&e));
    let ping = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => fail(&e),
        Err(_) => fail(&"no answer to PING within 3 s"),
    }
}

/// [`env::redis_url`], after checking that Redis answers (see [`redis_client`]).
pub async fn redis_url() -> String {
    redis_client().await;
    env::redis_url()
}

/// A key prefix no other test uses: [`env::unique_name`] followed by `:`.
#[must_use]
pub fn unique_prefix(tag: &str) -> String {
    format!("{}:", env::unique_name(tag))
}

/// A Redis Cluster of `redis-server` processes on loopback ports, for tests: every master owns
/// an equal share of the 16,384 slots, nothing kept on disk beyond a temporary directory, and
/// replicas only when asked for ([`LocalCluster::start_with`]). Dropping it kills the servers
/// and removes the directory.
///
/// ```no_run
/// # async fn demo() {
/// use tiercache_testkit::redis_env::LocalCluster;
///
/// let Some(cluster) = LocalCluster::start(3).await else {
///     return; // redis-server is not installed: start() said so loudly
/// };
/// let seeds: Vec<String> = cluster.nodes(); // ["redis://127.0.0.1:<port>/", ...]
/// # let _ = seeds; }
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    servers: Vec<std::process::Child>,
    /// Client ports: the masters' first, then the replicas'.
    ports: Vec<u16>,
    masters: usize,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    /// Starts `masters` servers and joins them into one cluster with no replicas and a 5 s node
    /// time-out, waiting (up to 30 s) until every node reports the cluster `ok` with all slots
    /// served.
    ///
    /// Returns `None`, after printing a loud message on standard error, only when
    /// `redis-server` is not installed (with `CI` set, that is a failure instead).
    ///
    /// # Panics
    /// If a server does not start or the cluster does not form, with the servers' logs.
    pub async fn start(masters: usize) -> Option<Self> {
        Self::start_with(masters, 0, std::time::Duration::from_secs(5)).await
    }

    /// As [`LocalCluster::start`], with `replicas` more servers (replica `i` follows master
    /// `i % masters`, and has every write its master made before this returns) and
    /// `node_timeout` as the cluster's `cluster-node-timeout`: how long a master must be
    /// unreachable before its replica is elected in its place.
    ///
    /// # Panics
    /// As [`LocalCluster::start`]; also if a replica does not finish its first sync in 30 s.
    pub async fn start_with(
        masters: usize,
        replicas: usize,
        node_timeout: std::time::Duration,
    ) -> Option<Self> {
        assert!(masters >= 1, "a cluster needs at least one master");
        if !redis_server_installed("no Redis Cluster can be built for this test") {
            return None;
        }
        let nodes = masters + replicas;
        let dir = std::env::temp_dir().join(env::unique_name("cluster"));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the cluster");
        // Client and bus ports for every node, all free when chosen (the listeners are held
        // until every port is picked, so no two coincide).
        let listeners: Vec<std::net::TcpListener> = (0..nodes * 2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
            .collect();
        let picked: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("a bound port").port())
            .collect();
        drop(listeners);
        let (ports, bus_ports) = picked.split_at(nodes);
        let mut cluster = LocalCluster {
            servers: Vec::new(),
            ports: ports.to_vec(),
            masters,
            dir,
        };
        for (&port, &bus) in ports.iter().zip(bus_ports) {
            cluster.spawn(port, bus, node_timeout);
        }
        let mut cons = Vec::new();
        for &port in &cluster.ports {
            cons.push(cluster.connect(port).await);
        }
        // Equal slot ranges on the masters, then every node meets the first.
        let per = 16_384 / masters;
        for (i, con) in cons.iter_mut().take(masters).enumerate() {
            let first = i * per;
            let last = if i + 1 == masters {
                16_383
            } else {
                first + per - 1
            };
            cluster
                .query::<()>(
                    con,
                    redis::cmd("CLUSTER")
                        .arg("ADDSLOTSRANGE")
                        .arg(first)
                        .arg(last),
                )
                .await;
        }
        for con in cons.iter_mut().skip(1) {
            cluster
                .query::<()>(
                    con,
                    redis::cmd("CLUSTER")
                        .arg("MEET")
                        .arg("127.0.0.1")
                        .arg(cluster.ports[0])
                        .arg(bus_ports[0]),
                )
                .await;
        }
        let formed = |info: &str| {
            info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && info.contains(&format!("cluster_known_nodes:{nodes}\r"))
        };
        cluster
            .wait_for(&mut cons, "form", |_, info| formed(info))
            .await;
        if replicas > 0 {
            let mut ids = Vec::new();
            for con in cons.iter_mut().take(masters) {
                let id: String = cluster.query(con, redis::cmd("CLUSTER").arg("MYID")).await;
                ids.push(id);
            }
            for (i, con) in cons.iter_mut().enumerate().skip(masters) {
                let master = &ids[(i - masters) % masters];
                cluster
                    .query::<()>(con, redis::cmd("CLUSTER").arg("REPLICATE").arg(master))
                    .await;
            }
            // Every replica linked to its master and in sync; every master knows its replica.
            cluster
                .wait_for(&mut cons, "sync its replicas", |i, info| {
                    if i < masters {
                        let expected = (masters..nodes).filter(|r| r % masters == i).count();
                        info.contains(&format!("connected_slaves:{expected}\r"))
                    } else {
                        info.contains("master_link_status:up")
                            && info.contains("master_sync_in_progress:0")
                    }
                })
                .await;
        }
        Some(cluster)
    }

    fn spawn(&mut self, port: u16, bus: u16, node_timeout: std::time::Duration) {
        use std::process::{Command, Stdio};
        let (port, bus) = (port.to_string(), bus.to_string());
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--cluster-port",
                &bus,
                "--bind",
                "127.0.0.1",
            ])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout"])
            .arg(node_timeout.as_millis().to_string())
            // A stopped node's slots fail; the others keep serving theirs.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--logfile", &format!("redis-{port}.log"), "--dir"])
            .arg(&self.dir)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.servers.push(child);
    }

    /// Waits (up to 30 s) until `done(node index, INFO text)` holds on every node, where the
    /// text is `CLUSTER INFO` followed by `INFO replication`.
    async fn wait_for(
        &self,
        cons: &mut [redis::aio::MultiplexedConnection],
        what: &str,
        done: impl Fn(usize, &str) -> bool,
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mut all = true;
            for (i, con) in cons.iter_mut().enumerate() {
                let cluster: String = self.query(con, redis::cmd("CLUSTER").arg("INFO")).await;
                let replication: String =
                    self.query(con, redis::cmd("INFO").arg("replication")).await;
                all &= done(i, &format!("{cluster}\r\n{replication}"));
            }
            if all {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the Redis Cluster did not {what} within 30 s; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The masters' URLs, `redis://127.0.0.1:<port>/` each (seed nodes for a client).
    #[must_use]
    pub fn nodes(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// The masters' client ports.
    #[must_use]
    pub fn ports(&self) -> &[u16] {
        &self.ports[..self.masters]
    }

    /// The replicas' client ports (replica `i` first followed master `i % masters`).
    #[must_use]
    pub fn replica_ports(&self) -> &[u16] {
        &self.ports[self.masters..]
    }

    /// Kills the server of node `index` (masters first, then replicas): a master's slots stop
    /// being served until its replica, if it has one, is elected in its place; the other
    /// masters go on, since the cluster does not require full coverage.
    ///
    /// # Panics
    /// If there is no node `index`.
    pub fn kill(&mut self, index: usize) {
        let server = &mut self.servers[index];
        let _ = server.kill();
        let _ = server.wait();
    }

    /// A connection to one node (not cluster-aware: it sees that node's keys only).
    ///
    /// # Panics
    /// If the node does not answer within 10 s.
    pub async fn connect(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .expect("a loopback URL parses");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let attempt = async {
                // Generous: a node forking for a replica's first sync may take a while to answer
                // (the client's default gives up after half a second).
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(std::time::Duration::from_secs(5)));
                let mut con = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("PING").query_async::<String>(&mut con).await?;
                Ok::<_, redis::RedisError>(con)
            };
            match attempt.await {
                Ok(con) => return con,
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "cluster node on port {port} did not answer: {e}; logs:\n{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
        cmd: &mut redis::Cmd,
    ) -> T {
        match cmd.query_async(con).await {
            Ok(value) => value,
            Err(e) => panic!("setting up the cluster: {e}; logs:\n{}", self.logs()),
        }
    }

    /// The servers' log files, for a failure message.
    fn logs(&self) -> String {
        self.ports
            .iter()
            .map(|p| {
                let log = std::fs::read_to_string(self.dir.join(format!("redis-{p}.log")))
                    .unwrap_or_default();
                format!("--- node {p}\n{log}")
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of a test's own, on a free port, that the test may pause (SIGSTOP: the
/// process hangs, connections stay open) and resume, or kill. The shared server on 6379 is
/// never touched. Stopped when dropped.
///
/// ```no_run
/// # async fn demo() {
/// use tiercache_testkit::redis_env::LocalRedis;
///
/// let Some(redis) = LocalRedis::start().await else {
///     return; // redis-server is not installed: start() said so loudly
/// };
/// let url = redis.url();
/// redis.pause(); // hung: every command waits
/// redis.resume();
/// # let _ = url; }
/// ```
#[derive(Debug)]
pub struct LocalRedis {
    server: std::process::Child,
    port: u16,
}

impl LocalRedis {
    /// Starts one, and waits (up to 10 s) until it answers a PING.
    ///
    /// Returns `None`, after printing a loud message on standard error, only when
    /// `redis-server` is not installed (with `CI` set, that is a failure instead).
    ///
    /// # Panics
    /// If the server does not start or answer.
    pub async fn start() -> Option<Self> {
        use std::process::{Command, Stdio};
        if !redis_server_installed("this test cannot start a Redis of its own") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let server = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = LocalRedis { server, port };
        let client = redis::Client::open(redis.url()).expect("a loopback URL parses");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ping = async {
                let mut con = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut con).await
            };
            if ping.await.is_ok() {
                return Some(redis);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the test's redis-server on port {port} did not answer within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:<port>/`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the process (SIGSTOP): it hangs, its connections stay open, nothing answers.
    ///
    /// # Panics
    /// If `kill` cannot be run.
    pub fn pause(&self) {
        assert!(self.signal("-STOP"), "kill -STOP failed");
    }

    /// Lets a paused process go on (SIGCONT).
    ///
    /// # Panics
    /// If `kill` cannot be run.
    pub fn resume(&self) {
        assert!(self.signal("-CONT"), "kill -CONT failed");
    }

    fn signal(&self, signal: &str) -> bool {
        std::process::Command::new("kill")
            .args([signal, &self.server.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        // A paused process is killed all the same; resume it first so it exits cleanly.
        let _ = self.signal("-CONT");
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
