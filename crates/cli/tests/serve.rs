//! `userconfig serve`'s REST contract: every route and status code, ETag and If-Match, merge
//! patch semantics, 400 before any I/O, 503 while the database is down, graceful shutdown.

mod support;

use support::{Server, TempDir, get, request};

const PATH: &str = "/v1/users/alice/config";

#[test]
fn get_put_patch_delete_follow_the_contract() {
    let dir = TempDir::new("serve_contract");
    let server = Server::serve(&dir.sqlite_url());
    let addr = server.addr.as_str();

    // Unknown user: the defaults, version 0.
    let r = get(addr, PATH);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("etag"), Some("\"0\""));
    assert_eq!(r.header("x-config-stored"), Some("false"));
    assert_eq!(r.json()["user_id"], "alice");
    assert_eq!(r.json()["preferences"]["theme"], "system");

    // PUT without If-Match: stored (201: created); unknown fields survive.
    let body = br#"{"preferences":{"theme":"dark","language":"de"},"future":{"x":1}}"#;
    let r = request(addr, "PUT", PATH, &[], body);
    assert_eq!(
        (r.status, r.header("etag")),
        (201, Some("\"1\"")),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["version"], 1);
    let r = get(addr, PATH);
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(r.header("cache-control"), Some("private, no-cache"));
    assert_eq!(r.header("x-config-stored"), Some("true"));
    assert_eq!(r.json()["preferences"]["theme"], "dark");
    assert_eq!(r.json()["future"]["x"], 1);

    // PUT with If-Match: a compare-and-set.
    let r = request(addr, "PUT", PATH, &[("If-Match", "\"1\"")], body);
    assert_eq!(r.status, 200, "{}", r.text());
    // An unchanged value keeps its version (nothing was written).
    assert_eq!(r.header("etag"), Some("\"1\""));
    let changed = br#"{"preferences":{"theme":"light"},"future":{"x":1}}"#;
    let r = request(addr, "PUT", PATH, &[("If-Match", "\"1\"")], changed);
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"2\"")),
        "{}",
        r.text()
    );
    let r = request(addr, "PUT", PATH, &[("If-Match", "\"1\"")], body);
    assert_eq!(r.status, 412, "{}", r.text());
    assert_eq!(r.header("etag"), Some("\"2\""), "the current version");
    assert_eq!(r.json()["error"]["kind"], "conflict");
    assert_eq!(r.json()["error"]["current_version"], 2);
    assert_eq!(get(addr, PATH).json()["preferences"]["theme"], "light");

    // PATCH: RFC 7386. null removes a field (it reads as its default again), objects merge,
    // unknown fields are kept and may be added.
    let patch = br#"{"preferences":{"theme":null,"font_size":18},"added":[1,2]}"#;
    let r = request(
        addr,
        "PATCH",
        PATH,
        &[("Content-Type", "application/merge-patch+json")],
        patch,
    );
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"3\"")),
        "{}",
        r.text()
    );
    let c = get(addr, PATH).json();
    assert_eq!(c["preferences"]["theme"], "system", "null removed it");
    assert_eq!(c["preferences"]["font_size"], 18);
    assert_eq!(
        c["preferences"]["language"], "en",
        "the PUT replaced it before"
    );
    assert_eq!(c["future"]["x"], 1, "unknown field kept");
    assert_eq!(c["added"], serde_json::json!([1, 2]));
    let r = request(addr, "PATCH", PATH, &[], br#"{"future":null}"#);
    assert_eq!(r.status, 200);
    assert!(
        get(addr, PATH).json().get("future").is_none(),
        "null removes unknown fields too"
    );

    // PATCH with If-Match: one attempt against that version.
    let r = request(addr, "PATCH", PATH, &[("If-Match", "\"3\"")], br#"{"a":1}"#);
    assert_eq!(
        (r.status, r.json()["error"]["current_version"].as_u64()),
        (412, Some(4))
    );
    let r = request(addr, "PATCH", PATH, &[("If-Match", "\"4\"")], br#"{"a":1}"#);
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"5\"")),
        "{}",
        r.text()
    );

    // A patch that breaks the schema, or is not an object: 400, nothing written.
    let r = request(
        addr,
        "PATCH",
        PATH,
        &[],
        br#"{"preferences":{"font_size":"big"}}"#,
    );
    assert_eq!(
        (r.status, &r.json()["error"]["kind"]),
        (400, &serde_json::json!("invalid_input"))
    );
    let r = request(addr, "PATCH", PATH, &[], b"[1]");
    assert_eq!(r.status, 400);
    let r = request(
        addr,
        "PATCH",
        PATH,
        &[],
        br#"{"image_generation":{"max_image_size":1}}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("max_image_size"), "{}", r.text());
    assert_eq!(get(addr, PATH).header("etag"), Some("\"5\""));

    // DELETE: the delete's version; again: 404; then the defaults at version 0.
    let r = request(addr, "DELETE", PATH, &[], b"");
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"6\"")),
        "{}",
        r.text()
    );
    let r = request(addr, "DELETE", PATH, &[], b"");
    assert_eq!(
        (r.status, &r.json()["error"]["kind"]),
        (404, &serde_json::json!("not_found"))
    );
    let r = get(addr, PATH);
    assert_eq!(
        (r.header("etag"), r.header("x-config-stored")),
        (Some("\"0\""), Some("false"))
    );

    // A method the route does not have.
    assert_eq!(request(addr, "POST", PATH, &[], b"{}").status, 405);
    assert_eq!(get(addr, "/v1/nothing").status, 404);
}

#[test]
fn stats_metrics_health_and_the_dashboard_are_served() {
    let dir = TempDir::new("serve_routes");
    let server = Server::serve(&dir.sqlite_url());
    let addr = server.addr.as_str();
    for _ in 0..3 {
        assert_eq!(get(addr, "/v1/users/bob/config").status, 200);
    }
    let stats = get(addr, "/stats");
    assert_eq!(stats.status, 200);
    let stats = stats.json();
    assert_eq!(stats["memory_cache"]["hits"], 2);
    assert_eq!(stats["memory_cache"]["max_size"], 500);
    assert_eq!(stats["database"]["backend"], "sqlite");

    // Live: each scrape shows the requests made up to it.
    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let hits = |text: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with(
                    "tiercache_requests_total{instance=\"0\",tier=\"memory\",outcome=\"hit\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no memory hits in {text}"))
    };
    assert_eq!(hits(&metrics.text()), 2.0);
    get(addr, "/v1/users/bob/config");
    let text = get(addr, "/metrics").text();
    assert_eq!(hits(&text), 3.0);
    assert!(
        text.contains("# TYPE tiercache_breaker_open gauge"),
        "{text}"
    );
    // The change feed's health: the embedded database's follower is connected.
    assert!(
        text.contains("tiercache_feed_connected{instance=\"0\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tiercache_feed_lag_seconds gauge"),
        "{text}"
    );
    assert!(
        text.contains(
            "userconfig_http_requests_total{route=\"GET /v1/users/{id}/config\",status=\"200\"} 4"
        ),
        "{text}"
    );

    // Every metric the Grafana dashboard draws is one /metrics serves.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).unwrap();
    let mut drawn = 0;
    for target in dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
    {
        let expr = target["expr"].as_str().unwrap();
        for (at, _) in expr
            .match_indices("tiercache_")
            .chain(expr.match_indices("userconfig_"))
        {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "Grafana draws {name}, /metrics lacks it"
            );
            drawn += 1;
        }
    }
    assert!(drawn >= 10, "{drawn}");

    assert_eq!(get(addr, "/healthz").status, 200);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(ready.json()["redis"], "none");
    assert_eq!(
        ready.json()["feed"],
        "ok",
        "the embedded database's feed follows"
    );

    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let page = page.text();
    assert!(
        page.contains("/dashboard/data") && !page.contains("https://"),
        "self-contained"
    );
    let data = get(addr, "/dashboard/data").json();
    assert_eq!(data["instances"], 1);
    assert_eq!(data["database"], "sqlite");
    assert_eq!(data["requests_total"], 4);
}

#[test]
fn bad_input_is_400_before_any_io_and_a_down_database_is_503() {
    // No server listens on port 1: any I/O fails, so a 400 proves none was attempted.
    let server = Server::serve("postgres://nobody@127.0.0.1:1/none");
    let addr = server.addr.as_str();
    let long = format!("/v1/users/{}/config", "x".repeat(300));
    for (method, path, body, headers) in [
        ("GET", long.as_str(), &b""[..], &[][..]),
        ("GET", "/v1/users/%01bad/config", b"", &[]),
        ("PUT", PATH, b"{not json", &[]),
        (
            "PUT",
            PATH,
            br#"{"image_generation":{"retention_hours":0}}"#,
            &[],
        ),
        ("PUT", PATH, br#"{"user_id":"mallory"}"#, &[]),
        ("PUT", PATH, b"{}", &[("If-Match", "7")]),
        ("PUT", PATH, b"{}", &[("If-None-Match", "*, \"1\"")]),
        ("GET", PATH, b"", &[("If-None-Match", "W/1")]),
        ("DELETE", PATH, b"", &[("If-Match", "\"1\" x")]),
        ("PATCH", PATH, b"\"text\"", &[]),
        ("DELETE", long.as_str(), b"", &[]),
    ] {
        let r = request(addr, method, path, headers, body);
        assert_eq!(r.status, 400, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "invalid_input");
    }
    let r = get(addr, PATH);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["kind"], "unavailable");
    assert!(
        !r.text().contains("nobody@"),
        "no URL in errors: {}",
        r.text()
    );
    let r = request(addr, "PUT", PATH, &[], b"{}");
    assert_eq!(r.status, 503, "{}", r.text());
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["database"], "down");
    assert_eq!(get(addr, "/healthz").status, 200, "alive, though not ready");
}

#[test]
fn sigterm_finishes_and_exits_zero() {
    let dir = TempDir::new("serve_stop");
    let server = Server::serve(&dir.sqlite_url());
    assert_eq!(request(&server.addr, "PUT", PATH, &[], b"{}").status, 201);
    let (status, said) = server.terminate();
    assert!(status.success(), "{status:?}: {said:?}");
    assert!(said.iter().any(|l| l.contains("stopped")), "{said:?}");
}

#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    use std::io::{Read as _, Write as _};

    let dir = TempDir::new("serve_in_flight");
    let server = Server::serve(&dir.sqlite_url());
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    // The head is sent and the handler waits for the body: in flight when SIGTERM arrives.
    stream
        .write_all(
            b"PUT /v1/users/zed/config HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\
              Connection: close\r\n\r\n{",
        )
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.sigterm();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The request in flight is still served.
    stream.write_all(b"}").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    let (status, said) = server.wait();
    assert!(status.success(), "{status:?}: {said:?}");
    // And the write it carried is stored.
    let get = std::process::Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args(["get", "zed", "--require-stored"])
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", dir.sqlite_url())
        .output()
        .unwrap();
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
}
