//! What the binary's tests share: a running `userconfig serve` or `simulate --serve`, and a
//! small HTTP/1.1 client (one request per connection).

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tiercache_testkit::env;

/// A service token made by `userconfig token`, and its line for the tokens file.
pub fn token(name: &str, scopes: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args(["token", "--name", name, "--scopes", scopes, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = json["token"].as_str().unwrap().to_owned();
    let line = json["line"].as_str().unwrap().to_owned();
    assert!(
        !line.contains(&token),
        "the file holds the hash, not the token"
    );
    (token, line)
}

/// A response: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One request to `addr` (`host:port`).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = TcpStream::connect(addr).expect("the server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        body = unchunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn unchunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

pub fn get(addr: &str, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(env::unique_name(tag));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn sqlite_url(&self) -> String {
        format!("sqlite:{}", self.0.join("userconfig.sqlite3").display())
    }
}

/// Two instances on one SQLite file in `dir`: the first follows the database's changes, the
/// second does not (its caches never hear of a write made through the first), for tests of
/// what must be decided by the database, not by a cache that is behind.
pub async fn instance_and_deaf_one(
    dir: &TempDir,
) -> (userconfig::UserConfigStorage, userconfig::UserConfigStorage) {
    let path = dir.0.join("db.sqlite3");
    let following = userconfig::UserConfigStorage::builder()
        .sqlite_path(&path)
        .build()
        .await
        .unwrap();
    let deaf = userconfig::UserConfigStorage::builder()
        .sqlite_path(&path)
        .follow_changes(false)
        .build()
        .await
        .unwrap();
    (following, deaf)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `userconfig` process that serves HTTP, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The rest of standard error, read in the background.
    pub stderr: std::sync::mpsc::Receiver<String>,
}

impl Server {
    /// Runs `userconfig <args>` on `database` and waits for the line that names its address
    /// (`prefix` then `http://ADDR`) on standard output or error.
    pub fn start(args: &[&str], database: &str, prefix: &str, on_stderr: bool) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_userconfig"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_NODES")
            .env("DATABASE_URL", database)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let (rest_tx, rest) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (watched, other): (Box<dyn Read + Send>, Box<dyn Read + Send>) = if on_stderr {
            (Box::new(stderr), Box::new(stdout))
        } else {
            (Box::new(stdout), Box::new(stderr))
        };
        let rest_tx2 = rest_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(watched).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line.clone());
                let _ = rest_tx2.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(other).lines().map_while(Result::ok) {
                let _ = rest_tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(prefix) {
                        let url = &line[at + prefix.len()..];
                        break url
                            .trim_start_matches("http://")
                            .trim_end_matches('/')
                            .to_owned();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let said: Vec<String> = rest.try_iter().collect();
                    panic!("userconfig {args:?} did not say where it listens: {said:?}");
                }
            }
        };
        Server {
            child,
            addr,
            stderr: rest,
        }
    }

    /// `userconfig serve` on `database`, on a free port.
    pub fn serve(database: &str) -> Self {
        Server::start(
            &["serve", "--listen", "127.0.0.1:0"],
            database,
            "listening on ",
            false,
        )
    }

    /// `userconfig serve` on `dir`'s database, on a free port, with a tokens file of `lines`
    /// and `extra` arguments.
    pub fn with_tokens(dir: &TempDir, lines: &[&str], extra: &[&str]) -> Self {
        let file = dir.0.join("tokens");
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--tokens-file"];
        args.push(file.to_str().unwrap());
        args.extend_from_slice(extra);
        Server::start(&args, &dir.sqlite_url(), "listening on ", false)
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(self) -> (std::process::ExitStatus, Vec<String>) {
        self.sigterm();
        self.wait()
    }

    /// Waits for the exit.
    pub fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let exit = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let said = self.stderr.try_iter().collect();
        (exit, said)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
