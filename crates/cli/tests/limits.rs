//! `userconfig serve`'s limits, as a client that misbehaves sees them: a half-sent head is
//! closed, a crowd of silent connections does not keep the others out, requests past the
//! in-flight cap or the request timeout are 503, a token past its rate 429, and a shutdown
//! ends by its deadline with the pending cache work flushed; every error carries its request
//! id and no cause.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Server, TempDir, get, request, token};

const PATH: &str = "/v1/users/alice/config";

fn serve(dir: &TempDir, extra: &[&str]) -> Server {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args, &dir.sqlite_url(), "listening on ", false)
}

/// A connection that has sent `bytes` and nothing more.
fn half_sent(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Whether the server closes `stream` (with or without a last response) within 20 s.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

#[test]
fn a_half_sent_head_is_closed_after_the_header_timeout() {
    let dir = TempDir::new("limits_head");
    let server = serve(&dir, &["--header-timeout", "0.5"]);
    let mut slow = half_sent(&server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    assert!(closed_by_server(&mut slow), "a half-sent head was held");
    // An idle keep-alive connection too, after a complete exchange.
    let mut idle = half_sent(&server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed_by_server(&mut idle), "an idle connection was held");
    assert_eq!(get(&server.addr, "/healthz").status, 200);
}

#[test]
fn ten_thousand_silent_connections_do_not_keep_the_others_out() {
    let dir = TempDir::new("limits_crowd");
    let server = serve(&dir, &[]);
    let mut crowd = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        crowd.push(half_sent(&server.addr, b"GET / HTTP/1.1\r\n"));
    }
    let r = get(&server.addr, PATH);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(&server.addr, "PUT", PATH, &[], b"{}");
    assert_eq!(r.status, 201, "{}", r.text());
    drop(crowd);

    // A small cap: the connection past it is told 503 at once, and served again once the
    // others go.
    let capped = serve(&dir, &["--max-connections", "20"]);
    let crowd: Vec<_> = (0..20)
        .map(|_| half_sent(&capped.addr, b"GET / HTTP/1.1\r\n"))
        .collect();
    let r = get(&capped.addr, "/healthz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["kind"], "overloaded");
    drop(crowd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&capped.addr, "/healthz").status != 200 {
        assert!(Instant::now() < deadline, "the slots were never given back");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = get(&capped.addr, "/metrics").text();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("userconfig_http_connections_refused_total ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

#[test]
fn past_the_in_flight_cap_or_the_request_timeout_is_503() {
    let dir = TempDir::new("limits_requests");
    let server = serve(&dir, &["--max-in-flight", "1", "--request-timeout", "2"]);
    // A request whose body never finishes holds the one slot…
    let head = format!("PUT {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{{\"a\"");
    let mut stuck = half_sent(&server.addr, head.as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    // …so another is shed at once, not queued; /healthz is not counted.
    let r = get(&server.addr, PATH);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["kind"], "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(get(&server.addr, "/healthz").status, 200);
    // The stuck one is answered 503 at the request timeout, and nothing was stored.
    stuck
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    let _ = stuck.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"kind\":\"timeout\""), "{answer}");
    let r = get(&server.addr, PATH);
    assert_eq!(r.status, 200, "the slot was given back: {}", r.text());
    assert_eq!(r.header("x-config-stored"), Some("false"));
}

#[test]
fn a_token_past_its_rate_is_429_and_the_others_are_not() {
    let dir = TempDir::new("limits_rate");
    let ((busy, busy_line), (calm, calm_line)) = (token("busy", "read"), token("calm", "read"));
    let (busy, calm) = (format!("Bearer {busy}"), format!("Bearer {calm}"));
    let server = Server::with_tokens(&dir, &[&busy_line, &calm_line], &["--rate-per-token", "2"]);
    let statuses: Vec<_> = (0..10)
        .map(|_| request(&server.addr, "GET", PATH, &[("Authorization", &busy)], b""))
        .collect();
    assert_eq!(statuses[0].status, 200);
    let limited = statuses
        .iter()
        .find(|r| r.status == 429)
        .expect("ten requests at once exceed 2 a second");
    assert_eq!(limited.json()["error"]["kind"], "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("1"));
    let r = request(&server.addr, "GET", PATH, &[("Authorization", &calm)], b"");
    assert_eq!(r.status, 200, "another token has its own rate");
}

#[test]
fn a_shutdown_ends_by_its_deadline_and_flushes() {
    let dir = TempDir::new("limits_shutdown");
    let server = serve(
        &dir,
        &["--shutdown-deadline", "1", "--header-timeout", "60"],
    );
    assert_eq!(
        request(
            &server.addr,
            "PUT",
            PATH,
            &[],
            br#"{"preferences":{"theme":"dark"}}"#
        )
        .status,
        201
    );
    // A head never finished, and a body never finished: neither may hold the shutdown.
    let _head = half_sent(&server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let _body = half_sent(
        &server.addr,
        format!("PUT {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{{").as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(200));
    server.sigterm();
    let mut child = server;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "still running 30 s after SIGTERM with a 1 s deadline"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, said) = child.wait();
    assert!(status.success(), "{status:?}: {said:?}");
    assert!(
        said.iter().any(|l| l.contains("shutdown deadline passed")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("stopped")),
        "flushed: {said:?}"
    );
}

#[test]
fn errors_carry_the_request_id_and_never_the_cause() {
    // Nothing listens on port 1: every read is a 503.
    let server = Server::serve("postgres://nobody:hunter2pw@127.0.0.1:1/none");
    let r = request(&server.addr, "GET", PATH, &[("X-Request-Id", "lb-42")], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.header("x-request-id"),
        Some("lb-42"),
        "the caller's id is kept"
    );
    let error = &r.json()["error"];
    assert_eq!(error["request_id"], "lb-42");
    assert_eq!(error["kind"], "unavailable");
    for leak in [
        "tier",
        "postgres",
        "refused",
        "127.0.0.1",
        "nobody",
        "hunter2pw",
    ] {
        assert!(!r.text().contains(leak), "{leak:?} in {}", r.text());
    }
    let ready = get(&server.addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.json().get("error").is_none(), "{}", ready.text());
    let id = ready.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 16, "a new id: {id}");
    // The operator's log has the cause, under the id; the access log has the route template.
    let (_, said) = server.terminate();
    assert!(
        said.iter()
            .any(|l| l.contains("lb-42") && l.contains("request failed") && l.contains("postgres")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("access")
            && l.contains("/v1/users/{id}/config")
            && l.contains("lb-42")
            && l.contains("503")),
        "{said:?}"
    );
    assert!(
        !said
            .iter()
            .any(|l| l.contains("alice") || l.contains("hunter2pw")),
        "no user id or password in the log: {said:?}"
    );
}
