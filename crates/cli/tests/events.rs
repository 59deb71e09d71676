//! A user's configuration as Server-Sent Events, and `userconfig watch`, against two
//! `userconfig serve` instances on one database: a change made through one reaches a stream
//! on the other; a stream cut and resumed with `Last-Event-ID` misses nothing and repeats
//! nothing; heartbeats; the caps per caller and who may open one; a shutdown ends the streams
//! at once rather than at its deadline.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Server, TempDir, request, token};

const PATH: &str = "/v1/users/sam/config";
const EVENTS: &str = "/v1/users/sam/config/events";

/// An open event stream: its status, then its events.
struct Stream {
    reader: BufReader<TcpStream>,
    status: u16,
    /// The raw lines read so far (comments included), for heartbeats.
    lines: Vec<String>,
}

/// One `config` event.
#[derive(Debug)]
struct Event {
    id: u64,
    data: serde_json::Value,
}

impl Stream {
    fn open(addr: &str, headers: &[(&str, &str)]) -> Stream {
        Stream::open_path(addr, EVENTS, headers)
    }

    /// `GET path` on `addr` as an event stream: its status, then its body line by line.
    fn open_path(addr: &str, path: &str, headers: &[(&str, &str)]) -> Stream {
        let mut socket = TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        socket.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(socket);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        // The rest of the head.
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        Stream {
            reader,
            status,
            lines: Vec::new(),
        }
    }

    /// The next line of the body (chunk sizes skipped), or `None` at the end.
    fn line(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => panic!("no line within 10 s: {e}"),
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            // A chunk's size line (hex digits alone); event lines always hold a colon or are
            // empty.
            if !line.is_empty()
                && !line.contains(':')
                && line.chars().all(|c| c.is_ascii_hexdigit())
            {
                continue;
            }
            self.lines.push(line.clone());
            return Some(line);
        }
    }

    /// The next `config` event.
    fn next(&mut self) -> Event {
        let (mut id, mut data) = (None, None);
        loop {
            let line = self.line().expect("the stream ended before an event");
            if let Some(v) = line
                .strip_prefix("id: ")
                .or_else(|| line.strip_prefix("id:"))
            {
                id = Some(v.trim().parse().unwrap());
            } else if let Some(v) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                data = Some(serde_json::from_str(v).unwrap());
            } else if line.is_empty()
                && let (Some(id), Some(data)) = (id, data.take())
            {
                return Event { id, data };
            }
        }
    }
}

fn put(addr: &str, theme: &str, headers: &[(&str, &str)]) -> u64 {
    let body = format!(r#"{{"preferences":{{"theme":"{theme}"}}}}"#);
    let r = request(addr, "PUT", PATH, headers, body.as_bytes());
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    r.json()["version"].as_u64().unwrap()
}

#[test]
fn a_stream_on_one_instance_sees_every_change_made_through_another_and_resumes_without_a_gap() {
    let dir = TempDir::new("serve_events");
    let a = Server::serve(&dir.sqlite_url());
    let b = Server::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--stream-heartbeat",
            "0.2",
        ],
        &dir.sqlite_url(),
        "listening on ",
        false,
    );
    let (a, b_addr) = (a.addr.as_str(), b.addr.clone());

    let mut stream = Stream::open(&b_addr, &[]);
    assert_eq!(stream.status, 200);
    let first = stream.next();
    assert_eq!(
        (first.id, &first.data["stored"]),
        (0, &serde_json::json!(false))
    );
    assert_eq!(first.data["config"]["user_id"], "sam");

    let v1 = put(a, "dark", &[]);
    let seen = stream.next();
    assert_eq!(seen.id, v1);
    assert_eq!(seen.data["config"]["preferences"]["theme"], "dark");
    assert_eq!(seen.data["version"], v1);

    // Idle: heartbeats (comment lines) keep it open.
    while !stream.lines.iter().any(|l| l.starts_with(':')) {
        assert!(stream.line().is_some());
    }

    // Cut. Two changes while away; resumed from v1, the configuration now arrives first.
    drop(stream);
    put(a, "light", &[]);
    let v3 = put(a, "blue", &[]);
    let mut resumed = Stream::open(&b_addr, &[("Last-Event-ID", &v1.to_string())]);
    let now = resumed.next();
    assert_eq!(now.id, v3);
    assert_eq!(now.data["config"]["preferences"]["theme"], "blue");

    // Resumed from what is current: nothing until the next change, which is a delete.
    let mut current = Stream::open(&b_addr, &[("Last-Event-ID", &v3.to_string())]);
    let r = request(a, "DELETE", PATH, &[], b"");
    assert_eq!(r.status, 200);
    let deleted = current.next();
    assert!(deleted.id > v3, "{deleted:?}");
    assert_eq!(deleted.data["stored"], false);
    assert_eq!(
        resumed.next().id,
        deleted.id,
        "the other stream sees the delete too, once"
    );

    // A Last-Event-ID that is not a version is refused.
    assert_eq!(
        Stream::open(&b_addr, &[("Last-Event-ID", "soon")]).status,
        400
    );

    // A shutdown ends the open streams at once: no connection is left for the deadline.
    let (status, said) = b.terminate();
    assert!(status.success(), "{said:?}");
    // Whatever was on its way, then the end.
    while current.line().is_some() {}
    assert!(
        !said.iter().any(|l| l.contains("shutdown deadline passed")),
        "a stream held the shutdown until its deadline: {said:?}"
    );
}

#[test]
fn streams_need_the_read_scope_and_are_capped_per_caller() {
    let dir = TempDir::new("serve_events_auth");
    let (reader, r_line) = token("reader", "read");
    let (other, o_line) = token("other", "read");
    let (ops, a_line) = token("ops", "admin");
    let server = Server::with_tokens(
        &dir,
        &[&r_line, &o_line, &a_line],
        &["--max-streams-per-token", "1"],
    );
    let addr = server.addr.as_str();
    let bearer = |t: &str| format!("Bearer {t}");
    assert_eq!(Stream::open(addr, &[]).status, 401);
    assert_eq!(
        Stream::open(addr, &[("Authorization", &bearer(&ops))]).status,
        403,
        "admin is not read"
    );
    let mut held = Stream::open(addr, &[("Authorization", &bearer(&reader))]);
    assert_eq!(held.status, 200);
    held.next();
    let second = request(
        addr,
        "GET",
        EVENTS,
        &[("Authorization", &bearer(&reader))],
        b"",
    );
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.json()["error"]["kind"], "too_many_streams");
    // Another caller has its own share.
    let mut theirs = Stream::open(addr, &[("Authorization", &bearer(&other))]);
    assert_eq!(theirs.status, 200);
    theirs.next();
    // A stream closed gives its place back.
    drop(held);
    let mut again = None;
    for _ in 0..100 {
        let s = Stream::open(addr, &[("Authorization", &bearer(&reader))]);
        if s.status == 200 {
            again = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    again
        .expect("the closed stream's place is given back")
        .next();
}

#[test]
fn watch_prints_a_json_line_per_change() {
    let dir = TempDir::new("cli_watch");
    let mut child = Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args(["watch", "sam", "--count", "3"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .env("DATABASE_URL", dir.sqlite_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (first["version"].as_u64(), &first["stored"]),
        (Some(0), &serde_json::json!(false))
    );
    let set = |theme: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_userconfig"))
            .args([
                "set",
                "sam",
                &format!(r#"{{"preferences":{{"theme":"{theme}"}}}}"#),
            ])
            .env_remove("REDIS_URL")
            .env("DATABASE_URL", dir.sqlite_url())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    set("dark");
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["config"]["preferences"]["theme"], "dark");
    set("light");
    let third: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(third["config"]["preferences"]["theme"], "light");
    assert!(third["version"].as_u64() > second["version"].as_u64());
    assert!(
        child.wait().unwrap().success(),
        "it stops after --count lines"
    );
}

/// `GET /v1/changes` on `addr`, from `since`.
fn changes(addr: &str, since: Option<&str>) -> Stream {
    let path = match since {
        Some(cursor) => format!("/v1/changes?since={cursor}"),
        None => "/v1/changes".to_owned(),
    };
    Stream::open_path(addr, &path, &[])
}

impl Stream {
    /// The next `change` event: its cursor, user, version and op.
    fn next_change(&mut self) -> (String, String, u64, String) {
        let (mut id, mut data) = (None, None);
        loop {
            let line = self.line().expect("the stream ended before a change");
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<serde_json::Value>(v).unwrap());
            } else if line.is_empty()
                && let (Some(id), Some(data)) = (id.take(), data.take())
            {
                return (
                    id,
                    data["user_id"].as_str().unwrap().to_owned(),
                    data["version"].as_u64().unwrap(),
                    data["op"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
}

#[test]
fn the_change_stream_carries_every_change_once_and_resumes_from_a_cursor() {
    let dir = TempDir::new("serve_changes");
    let a = Server::serve(&dir.sqlite_url());
    let b = Server::serve(&dir.sqlite_url());
    let mut stream = changes(&b.addr, None);
    assert_eq!(stream.status, 200);
    let put_user = |user: &str| {
        let r = request(
            &a.addr,
            "PUT",
            &format!("/v1/users/{user}/config"),
            &[],
            br#"{"preferences":{"theme":"dark"}}"#,
        );
        assert!(r.status == 200 || r.status == 201, "{}", r.text());
        r.json()["version"].as_u64().unwrap()
    };
    let vx = put_user("x");
    let vy = put_user("y");
    let r = request(&a.addr, "DELETE", "/v1/users/x/config", &[], b"");
    let vd = r.json()["version"].as_u64().unwrap();
    let first = stream.next_change();
    assert_eq!((&*first.1, first.2, &*first.3), ("x", vx, "write"));
    let second = stream.next_change();
    assert_eq!((&*second.1, second.2, &*second.3), ("y", vy, "write"));
    let third = stream.next_change();
    assert_eq!((&*third.1, third.2, &*third.3), ("x", vd, "delete"));
    // Cut, and resumed after the first: the rest, in order, none twice.
    drop(stream);
    let mut resumed = changes(&b.addr, Some(&first.0));
    assert_eq!(resumed.next_change().2, vy);
    assert_eq!(resumed.next_change().2, vd);
    let vz = put_user("z");
    assert_eq!(resumed.next_change().2, vz);
    // Another instance's cursor (or garbage) cannot be resumed from: 410, re-sync.
    let elsewhere = request(
        &a.addr,
        "GET",
        &format!("/v1/changes?since={}", first.0),
        &[],
        b"",
    );
    assert_eq!(elsewhere.status, 410, "{}", elsewhere.text());
    assert_eq!(elsewhere.json()["error"]["kind"], "resync");
    assert_eq!(changes(&b.addr, Some("nonsense")).status, 410);
}
