//! Conditional requests (RFC 9110) against two `userconfig serve` instances on one database:
//! each precondition is checked against the database, so an instance whose caches still hold
//! an older version refuses what the other's write made stale.

mod support;

use support::{Server, TempDir, get, request};

const PATH: &str = "/v1/users/carol/config";

fn theme(addr: &str) -> serde_json::Value {
    get(addr, PATH).json()["preferences"]["theme"].clone()
}

#[test]
fn preconditions_hold_across_two_instances() {
    let dir = TempDir::new("serve_conditional");
    let (a, b) = (
        Server::serve(&dir.sqlite_url()),
        Server::serve(&dir.sqlite_url()),
    );
    let (a, b) = (a.addr.as_str(), b.addr.as_str());
    let dark = br#"{"preferences":{"theme":"dark"}}"#;
    let light = br#"{"preferences":{"theme":"light"}}"#;
    let blue = br#"{"preferences":{"theme":"blue"}}"#;

    // If-Match: * needs a stored configuration; none is.
    let r = request(a, "PUT", PATH, &[("If-Match", "*")], dark);
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"0\"")),
        "{}",
        r.text()
    );
    assert_eq!(get(a, PATH).header("x-config-stored"), Some("false"));

    // If-None-Match: * creates only: 201 on A, then 412 on B (whose cache may say "none").
    assert_eq!(
        get(b, PATH).header("etag"),
        Some("\"0\""),
        "B caches 'none stored'"
    );
    let r = request(a, "PUT", PATH, &[("If-None-Match", "*")], dark);
    assert_eq!(
        (r.status, r.header("etag")),
        (201, Some("\"1\"")),
        "{}",
        r.text()
    );
    let r = request(b, "PUT", PATH, &[("If-None-Match", "*")], light);
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"1\"")),
        "{}",
        r.text()
    );
    assert_eq!(theme(a), "dark", "the refused create wrote nothing");

    // If-Match: * now holds, on either instance.
    let r = request(b, "PUT", PATH, &[("If-Match", "*")], light);
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"2\"")),
        "{}",
        r.text()
    );

    // Strong comparison: a weak tag never matches; a list matches any of its strong tags.
    let r = request(a, "PUT", PATH, &[("If-Match", "W/\"2\"")], blue);
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"2\"")),
        "{}",
        r.text()
    );
    let r = request(a, "PUT", PATH, &[("If-Match", "\"9\", \"2\"")], blue);
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"3\"")),
        "{}",
        r.text()
    );
    let r = request(
        b,
        "PATCH",
        PATH,
        &[("If-Match", "\"1\", \"2\"")],
        br#"{"x":1}"#,
    );
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"3\"")),
        "{}",
        r.text()
    );
    assert_eq!(theme(a), "blue");

    // GET with If-None-Match: 304 while it names the stored version (weakly), 200 after a
    // change made through the other instance (once B has heard of it).
    let r = request(a, "GET", PATH, &[("If-None-Match", "W/\"3\"")], b"");
    assert_eq!(
        (r.status, r.header("etag")),
        (304, Some("\"3\"")),
        "{}",
        r.text()
    );
    assert!(r.body.is_empty());
    assert_eq!(r.header("cache-control"), Some("private, no-cache"));
    let r = request(
        b,
        "PATCH",
        PATH,
        &[],
        br#"{"preferences":{"theme":"green"}}"#,
    );
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"4\"")),
        "{}",
        r.text()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = request(a, "GET", PATH, &[("If-None-Match", "\"3\"")], b"");
        if r.status == 200 {
            assert_eq!(r.header("etag"), Some("\"4\""));
            assert_eq!(r.json()["preferences"]["theme"], "green");
            break;
        }
        assert_eq!(r.status, 304, "{}", r.text());
        assert!(
            std::time::Instant::now() < deadline,
            "A never heard of version 4"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // DELETE with If-Match: a stale version deletes nothing, the stored one deletes.
    let r = request(a, "DELETE", PATH, &[("If-Match", "\"3\"")], b"");
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"4\"")),
        "{}",
        r.text()
    );
    assert_eq!(theme(b), "green", "nothing deleted");
    let r = request(a, "DELETE", PATH, &[("If-Match", "\"4\"")], b"");
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"5\"")),
        "{}",
        r.text()
    );
    let r = request(b, "DELETE", PATH, &[("If-Match", "*")], b"");
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some("\"0\"")),
        "{}",
        r.text()
    );

    // After the delete, a PATCH creates from the defaults (201) and a plain PUT replaces (200).
    let r = request(
        b,
        "PATCH",
        PATH,
        &[],
        br#"{"preferences":{"theme":"dark"}}"#,
    );
    assert_eq!(
        (r.status, r.header("etag")),
        (201, Some("\"6\"")),
        "{}",
        r.text()
    );
    let r = request(a, "PUT", PATH, &[], light);
    assert_eq!(
        (r.status, r.header("etag")),
        (200, Some("\"7\"")),
        "{}",
        r.text()
    );
}

/// An instance whose caches are behind (its change feed is off) still decides every
/// precondition by the database: its cached "nothing stored" does not fail `If-Match: *`, and
/// its cached version does not let a stale `If-Match` through.
#[tokio::test]
async fn a_cache_that_is_behind_never_decides_a_precondition() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    let dir = TempDir::new("conditional_stale");
    let (a, b) = support::instance_and_deaf_one(&dir).await;
    let router = userconfig_cli::router(b.clone());
    let call = |method: &str, header: (&str, &str), body: &'static str| {
        let request = Request::builder()
            .method(method)
            .uri(PATH)
            .header(header.0, header.1)
            .body(Body::from(body))
            .unwrap();
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await.unwrap();
            let etag = response.headers()["etag"].to_str().unwrap().to_owned();
            (response.status().as_u16(), etag)
        }
    };
    // B caches "nothing stored"; A creates version 1.
    assert_eq!(b.fetch_user_config("carol").await.unwrap().version, 0);
    let mut config = userconfig::UserConfig::default_for("carol");
    config.preferences.theme = "dark".into();
    let v1 = a.update_user_config("carol", &config).await.unwrap();
    assert_eq!(
        b.fetch_user_config("carol").await.unwrap().version,
        0,
        "B is behind"
    );
    let put = r#"{"preferences":{"theme":"light"}}"#;
    assert_eq!(
        call("PUT", ("if-match", "*"), put).await,
        (200, format!("\"{}\"", v1 + 1)),
        "the database has one: If-Match: * holds"
    );
    // B's cache now says v1 + 1; A moves it on. A stale If-Match is refused by the database.
    let v3 = a.update_user_config("carol", &config).await.unwrap();
    let stale = format!("\"{}\"", v1 + 1);
    assert_eq!(
        call("DELETE", ("if-match", &stale), "").await,
        (412, format!("\"{v3}\""))
    );
    assert_eq!(
        call("GET", ("if-none-match", "\"0\""), "").await.0,
        200,
        "a read may answer from the cache"
    );
    assert_eq!(
        a.load_user_config("carol").await.unwrap().version,
        v3,
        "nothing deleted"
    );
}

/// Merge patches from several clients through two instances, all on one user and each adding
/// its own field: the server's compare-and-set retries lose none of them.
#[test]
fn concurrent_patches_through_two_instances_lose_nothing() {
    let dir = TempDir::new("conditional_race");
    let servers = [
        Server::serve(&dir.sqlite_url()),
        Server::serve(&dir.sqlite_url()),
    ];
    let (clients, patches) = (4, 10);
    std::thread::scope(|scope| {
        for client in 0..clients {
            let addr = servers[client % 2].addr.clone();
            scope.spawn(move || {
                for n in 0..patches {
                    let body = format!(r#"{{"c{client}_{n}":true}}"#);
                    let r = request(&addr, "PATCH", PATH, &[], body.as_bytes());
                    assert!(
                        r.status == 200 || r.status == 201,
                        "{}: {}",
                        r.status,
                        r.text()
                    );
                }
            });
        }
    });
    let stored = request(
        &servers[0].addr,
        "GET",
        PATH,
        &[("Cache-Control", "no-cache")],
        b"",
    );
    let fields = stored.json();
    for client in 0..clients {
        for n in 0..patches {
            let name = format!("c{client}_{n}");
            // Read from the database: an instance's cache may still be a moment behind.
            if fields.get(&name).is_none() {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                loop {
                    let again = get(&servers[0].addr, PATH).json();
                    if again.get(&name).is_some() {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "{name} was lost");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}
