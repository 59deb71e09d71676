//! Who may use `userconfig serve`: service tokens with scopes, checked before anything is
//! read or stored, and no open service on an address other machines reach unless told.

mod support;

use std::process::{Command, Stdio};

use support::{Server, TempDir, get, request, token};

const PATH: &str = "/v1/users/alice/config";

/// Runs `command` to its end, at most 20 s (a service that should have refused to start
/// would serve for ever): killed and failed past that.
fn refused(mut command: Command) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("it did not refuse: it is still running after 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn with_tokens_every_route_checks_who_asks_before_anything_is_read_or_stored() {
    let dir = TempDir::new("serve_auth");
    let (reader, r_line) = token("reader", "read");
    let (writer, w_line) = token("writer", "read,write");
    let (admin, a_line) = token("ops", "admin");
    let server = Server::with_tokens(&dir, &["# service tokens", &r_line, &w_line, &a_line], &[]);
    let addr = server.addr.as_str();
    let bearer = |t: &str| format!("Bearer {t}");
    let body = br#"{"preferences":{"theme":"dark"}}"#;

    // No token, a token that is not one of ours: 401 with a challenge, on every route that
    // reads or changes anything.
    for (method, path) in [
        ("GET", PATH),
        ("PUT", PATH),
        ("PATCH", PATH),
        ("DELETE", PATH),
        ("GET", "/v1/users/alice/config/events"),
        ("GET", "/v1/users/alice/config/history"),
        ("GET", "/v1/users/alice/config/diff?from=1&to=2"),
        ("POST", "/v1/users/alice/config/rollback"),
        ("GET", "/v1/changes"),
        ("GET", "/stats"),
        ("GET", "/metrics"),
        ("GET", "/readyz"),
        ("GET", "/dashboard/data"),
    ] {
        let r = request(addr, method, path, &[], body);
        assert_eq!(r.status, 401, "{method} {path} with no token: {}", r.text());
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"userconfig\"")
        );
        assert_eq!(r.json()["error"]["kind"], "unauthorized");
        let wrong = bearer("uc_0000");
        let r = request(
            addr,
            method,
            path,
            &[("Authorization", wrong.as_str())],
            body,
        );
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("error=\"invalid_token\"")
        );
    }
    // Proxy headers grant nothing: no address is trusted, whatever a client says it is
    // (docs/security.md, "TLS and reverse proxies").
    for forged in [
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Real-IP", "127.0.0.1"),
        ("Forwarded", "for=127.0.0.1;proto=https"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "localhost"),
    ] {
        let r = request(addr, "GET", PATH, &[forged], b"");
        assert_eq!(r.status, 401, "{forged:?}: {}", r.text());
        assert!(!r.text().contains("127.0.0.1"), "{}", r.text());
    }
    // A token without the route's scope: 403.
    let read = bearer(&reader);
    let write = bearer(&writer);
    let ops = bearer(&admin);
    for (method, path, who) in [
        ("PUT", PATH, read.as_str()),
        ("PATCH", PATH, read.as_str()),
        ("DELETE", PATH, read.as_str()),
        ("POST", "/v1/users/alice/config/rollback", read.as_str()),
        ("GET", "/v1/users/alice/config/history", ops.as_str()),
        ("GET", "/metrics", read.as_str()),
        ("GET", "/stats", write.as_str()),
        ("GET", PATH, ops.as_str()),
    ] {
        let r = request(addr, method, path, &[("Authorization", who)], body);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "forbidden");
    }
    // Nothing refused reached the chain: no read, no negative entry, nothing stored.
    let stats = request(
        addr,
        "GET",
        "/stats",
        &[("Authorization", ops.as_str())],
        b"",
    );
    assert_eq!(stats.status, 200, "{}", stats.text());
    let stats = stats.json();
    assert_eq!(stats["memory_cache"]["entries"], 0, "{stats}");
    assert_eq!(stats["memory_cache"]["total_requests"], 0);
    assert_eq!(stats["database"]["loads"], 0);
    let r = request(addr, "GET", PATH, &[("Authorization", read.as_str())], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-config-stored"), Some("false"), "nothing stored");

    // Each scope does what it names; /healthz and the dashboard's page are open.
    let r = request(
        addr,
        "PUT",
        PATH,
        &[("Authorization", write.as_str())],
        body,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = request(addr, "GET", PATH, &[("Authorization", read.as_str())], b"");
    assert_eq!(r.json()["preferences"]["theme"], "dark");
    for path in ["/metrics", "/readyz", "/dashboard/data"] {
        let r = request(addr, "GET", path, &[("Authorization", ops.as_str())], b"");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/").status, 200);
    // Refusals are counted like every request (by route template, never the user).
    let metrics = request(
        addr,
        "GET",
        "/metrics",
        &[("Authorization", ops.as_str())],
        b"",
    );
    let text = metrics.text();
    assert!(
        text.contains("route=\"PUT /v1/users/{id}/config\",status=\"401\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("route=\"PUT /v1/users/{id}/config\",status=\"403\"} 1"),
        "{text}"
    );
}

#[test]
fn without_tokens_it_serves_only_on_loopback_unless_told() {
    let dir = TempDir::new("serve_open");
    // Another machine could reach it: refused before anything connects (exit code 2).
    let mut command = Command::new(env!("CARGO_BIN_EXE_userconfig"));
    command
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove("USERCONFIG_TOKENS_FILE")
        .env("DATABASE_URL", dir.sqlite_url());
    let out = refused(command);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--tokens-file") && said.contains("--insecure-no-auth"),
        "{said}"
    );
    assert!(
        !dir.0.join("userconfig.sqlite3").exists(),
        "nothing was opened"
    );
    // Told: it serves, open, and says so.
    let server = Server::start(
        &["serve", "--listen", "0.0.0.0:0", "--insecure-no-auth"],
        &dir.sqlite_url(),
        "listening on ",
        false,
    );
    let port = server.addr.rsplit(':').next().unwrap();
    let r = get(&format!("127.0.0.1:{port}"), PATH);
    assert_eq!(r.status, 200, "{}", r.text());
    // A bad tokens file is a usage error that names it.
    let mut command = Command::new(env!("CARGO_BIN_EXE_userconfig"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--tokens-file"])
        .arg(dir.0.join("missing"))
        .env("DATABASE_URL", dir.sqlite_url());
    let out = refused(command);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
}

/// A JWT for `claims`, HS256 with `secret` or ES256 with the test key of `tests/fixtures`.
fn jwt(claims: serde_json::Value, secret: Option<&[u8]>) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    match secret {
        Some(secret) => encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        ),
        None => {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some("test-es256".into());
            let pem = include_bytes!("fixtures/es256-test-key.pem");
            encode(&header, &claims, &EncodingKey::from_ec_pem(pem).unwrap())
        }
    }
    .unwrap()
}

#[test]
fn an_end_user_token_reaches_its_own_configuration_only() {
    let dir = TempDir::new("serve_jwt");
    let secret = b"a shared secret of at least 32 bytes, for HS256";
    let secret_file = dir.0.join("jwt-secret");
    std::fs::write(&secret_file, [&secret[..], b"\n"].concat()).unwrap();
    let jwks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks.json");
    let (admin, a_line) = token("ops", "admin");
    let server = Server::with_tokens(
        &dir,
        &[&a_line],
        &[
            "--jwt-secret-file",
            secret_file.to_str().unwrap(),
            "--jwks-file",
            jwks.to_str().unwrap(),
            "--jwt-issuer",
            "https://idp.example",
            "--jwt-audience",
            "userconfig",
        ],
    );
    let addr = server.addr.as_str();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |sub: &str| {
        serde_json::json!({
            "sub": sub, "iss": "https://idp.example", "aud": "userconfig", "exp": now + 300
        })
    };
    let alice = format!("Bearer {}", jwt(claims("alice"), Some(secret)));
    let alice_es = format!("Bearer {}", jwt(claims("alice"), None));
    let body = br#"{"preferences":{"theme":"dark"}}"#;
    let bob = "/v1/users/bob/config";

    // Her own configuration, with either key: read, write.
    let r = request(addr, "PUT", PATH, &[("Authorization", &alice)], body);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = request(addr, "GET", PATH, &[("Authorization", &alice_es)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["preferences"]["theme"], "dark");
    // Her id spelled with an escape is still her (the check decodes as the route does).
    let r = request(
        addr,
        "GET",
        "/v1/users/%61lice/config",
        &[("Authorization", &alice)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Someone else's, or the operator's routes: 403.
    for (method, path) in [
        ("GET", bob),
        ("PUT", bob),
        ("DELETE", bob),
        ("GET", "/v1/users/bob/config/history"),
        ("POST", "/v1/users/bob/config/rollback"),
        ("GET", "/v1/changes"),
        ("GET", "/metrics"),
        ("GET", "/stats"),
    ] {
        let r = request(addr, method, path, &[("Authorization", &alice)], body);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["error"]["kind"], "forbidden");
    }
    // Expired, not yet valid, for another audience or issuer, signed with another secret,
    // HS256 signed with the public key's bytes: 401, invalid_token.
    let mut expired = claims("alice");
    expired["exp"] = serde_json::json!(now - 600);
    let mut early = claims("alice");
    early["nbf"] = serde_json::json!(now + 600);
    let mut elsewhere = claims("alice");
    elsewhere["aud"] = serde_json::json!("billing");
    let mut stranger = claims("alice");
    stranger["iss"] = serde_json::json!("https://evil.example");
    let jwks_bytes = std::fs::read(&jwks).unwrap();
    for (what, token) in [
        ("expired", jwt(expired, Some(secret))),
        ("nbf ahead", jwt(early, Some(secret))),
        ("audience", jwt(elsewhere, Some(secret))),
        ("issuer", jwt(stranger, Some(secret))),
        (
            "secret",
            jwt(claims("alice"), Some(b"another secret, 32 bytes or more!!")),
        ),
        ("confusion", jwt(claims("alice"), Some(&jwks_bytes))),
    ] {
        // On every route that reads or changes anything, hers and the operator's.
        for (method, path) in [
            ("GET", PATH),
            ("PUT", PATH),
            ("PATCH", PATH),
            ("DELETE", PATH),
            ("GET", bob),
            ("GET", "/stats"),
            ("GET", "/metrics"),
            ("GET", "/readyz"),
            ("GET", "/dashboard/data"),
        ] {
            let r = request(
                addr,
                method,
                path,
                &[("Authorization", &format!("Bearer {token}"))],
                br#"{"preferences":{"theme":"light"}}"#,
            );
            assert_eq!(r.status, 401, "{what}, {method} {path}: {}", r.text());
            assert!(
                r.header("www-authenticate")
                    .unwrap()
                    .contains("invalid_token"),
                "{what}"
            );
        }
    }
    // Nothing refused was stored: her configuration is as she left it.
    let r = request(addr, "GET", PATH, &[("Authorization", &alice)], b"");
    assert_eq!(r.json()["preferences"]["theme"], "dark");
    // Nothing refused reached the chain for bob: not read, not cached, not stored.
    let stats = request(
        addr,
        "GET",
        "/stats",
        &[("Authorization", &format!("Bearer {admin}"))],
        b"",
    );
    assert_eq!(stats.status, 200, "{}", stats.text());
    let stats = stats.json();
    assert_eq!(stats["memory_cache"]["entries"], 1, "alice only: {stats}");
    let (_, said) = server.terminate();
    assert!(!said.iter().any(|l| l.contains("bob")), "{said:?}");
}

/// The same check for in-process users: `router_with_tokens`, called without a socket.
#[tokio::test]
async fn router_with_tokens_checks_in_process_too() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    let dir = TempDir::new("router_tokens");
    let storage = userconfig::UserConfigStorage::builder()
        .sqlite_path(dir.0.join("db.sqlite3"))
        .build()
        .await
        .unwrap();
    let (reader, line) = token("app", "read");
    assert!(
        userconfig_cli::router_with_tokens(storage.clone(), "app read uc_not_a_hash")
            .err()
            .unwrap()
            .contains("line 1")
    );
    let router = userconfig_cli::router_with_tokens(storage, &line).unwrap();
    let call = |auth: Option<String>| {
        let router = router.clone();
        async move {
            let mut request = Request::builder().uri(PATH);
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = router
                .oneshot(request.body(Body::empty()).unwrap())
                .await
                .unwrap();
            response.status().as_u16()
        }
    };
    assert_eq!(call(None).await, 401);
    assert_eq!(call(Some("Bearer uc_wrong".into())).await, 401);
    assert_eq!(call(Some(format!("Bearer {reader}"))).await, 200);
}
