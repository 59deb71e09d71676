//! A user's past configurations through `userconfig serve` and the command line (history, a
//! past version, a diff, rollback, deletion with the history), and reading one's own writes
//! through an instance whose caches are behind (`X-Min-Version`).

mod support;

use std::process::Command;

use support::{Server, TempDir, get, request};

const PATH: &str = "/v1/users/hugo/config";

fn put(addr: &str, theme: &str) -> u64 {
    let body = format!(r#"{{"preferences":{{"theme":"{theme}"}}}}"#);
    let r = request(addr, "PUT", PATH, &[], body.as_bytes());
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    r.json()["version"].as_u64().unwrap()
}

fn theme_of(value: &serde_json::Value) -> &str {
    value["preferences"]["theme"].as_str().unwrap()
}

#[test]
fn history_a_past_version_a_diff_and_rollback_over_http() {
    let dir = TempDir::new("serve_history");
    let server = Server::serve(&dir.sqlite_url());
    let addr = server.addr.as_str();
    let v1 = put(addr, "one");
    let v2 = put(addr, "two");
    let v3 = put(addr, "three");

    let history = get(addr, &format!("{PATH}/history")).json();
    let versions: Vec<(u64, String)> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                theme_of(&v["config"]).to_owned(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [(v3, "three".into()), (v2, "two".into()), (v1, "one".into())]
    );
    assert!(
        history["versions"][0]["at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let page = get(addr, &format!("{PATH}/history?limit=1&before={v3}")).json();
    assert_eq!(page["versions"][0]["version"], v2);
    assert_eq!(page["versions"].as_array().unwrap().len(), 1);
    assert_eq!(get(addr, &format!("{PATH}/history?limit=0")).status, 400);

    let past = get(addr, &format!("{PATH}?version={v1}"));
    assert_eq!(
        (past.status, past.header("etag")),
        (200, Some(&*format!("\"{v1}\"")))
    );
    assert_eq!(theme_of(&past.json()), "one");
    let missing = get(addr, &format!("{PATH}?version=999"));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["kind"], "not_kept");

    let diff = get(addr, &format!("{PATH}/diff?from={v1}&to={v3}"));
    assert_eq!(
        diff.header("content-type"),
        Some("application/json-patch+json")
    );
    assert_eq!(
        diff.json(),
        serde_json::json!([{"op": "replace", "path": "/preferences/theme", "value": "three"}])
    );

    // Rollback: a new version; pinned to a replaced version, 412 and nothing written.
    let body = format!(r#"{{"version":{v1}}}"#);
    let r = request(
        addr,
        "POST",
        &format!("{PATH}/rollback"),
        &[],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v4 = r.json()["version"].as_u64().unwrap();
    assert!(v4 > v3);
    assert_eq!(theme_of(&get(addr, PATH).json()), "one");
    let stale = format!("\"{v3}\"");
    let r = request(
        addr,
        "POST",
        &format!("{PATH}/rollback"),
        &[("If-Match", &stale)],
        format!(r#"{{"version":{v2}}}"#).as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("etag")),
        (412, Some(&*format!("\"{v4}\""))),
        "{}",
        r.text()
    );
    assert_eq!(theme_of(&get(addr, PATH).json()), "one");
    let r = request(
        addr,
        "POST",
        &format!("{PATH}/rollback"),
        &[],
        br#"{"version":999}"#,
    );
    assert_eq!(r.status, 404);
    let r = request(
        addr,
        "POST",
        &format!("{PATH}/rollback"),
        &[],
        br#"{"to":1}"#,
    );
    assert_eq!(r.status, 400);

    // Deletion for privacy: the history goes too.
    let r = request(
        addr,
        "DELETE",
        &format!("{PATH}?purge_history=true"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let after = get(addr, &format!("{PATH}/history")).json();
    assert_eq!(after["versions"], serde_json::json!([]));
}

#[test]
fn history_rollback_diff_and_purge_from_the_command_line() {
    let dir = TempDir::new("cli_history");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_userconfig"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_NODES")
            .env("DATABASE_URL", dir.sqlite_url())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    for theme in ["one", "two"] {
        let body = format!(r#"{{"preferences":{{"theme":"{theme}"}}}}"#);
        assert_eq!(run(&["set", "hugo", &body]).0, Some(0));
    }
    let (code, out) = run(&["history", "hugo", "--json"]);
    assert_eq!(code, Some(0));
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    let v1 = history["versions"][1]["version"].as_u64().unwrap();
    let v2 = history["versions"][0]["version"].as_u64().unwrap();
    let (_, patch) = run(&["diff", "hugo", &v1.to_string(), &v2.to_string()]);
    let patch: serde_json::Value = serde_json::from_str(&patch).unwrap();
    assert_eq!(patch[0]["value"], "two");
    // A stale --if-version is exit code 6; then the rollback itself.
    assert_eq!(
        run(&[
            "rollback",
            "hugo",
            &v1.to_string(),
            "--if-version",
            &v1.to_string()
        ])
        .0,
        Some(6)
    );
    let (code, out) = run(&["rollback", "hugo", &v1.to_string(), "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let (_, got) = run(&["get", "hugo", "--json"]);
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(theme_of(&got["config"]), "one");
    assert_eq!(run(&["rollback", "hugo", "999"]).0, Some(4), "not kept");
    assert_eq!(run(&["delete", "hugo", "--purge-history"]).0, Some(0));
    let (_, out) = run(&["history", "hugo", "--json"]);
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(history["versions"], serde_json::json!([]));
}

/// An instance whose caches never hear of a change (its feed off) answers `X-Min-Version`
/// from the database: a client that wrote through another instance reads its write.
#[tokio::test]
async fn x_min_version_reads_a_write_made_through_another_instance() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    let dir = TempDir::new("serve_min_version");
    let (a, b) = support::instance_and_deaf_one(&dir).await;
    let router = userconfig_cli::router(b.clone());
    let read = |min: Option<u64>| {
        let mut request = Request::builder().uri(PATH);
        if let Some(min) = min {
            request = request.header("x-min-version", min.to_string());
        }
        let router = router.clone();
        async move {
            let response = router
                .oneshot(request.body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = response.status().as_u16();
            let etag = response
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, etag)
        }
    };
    let mut config = userconfig::UserConfig::default_for("hugo");
    config.preferences.theme = "old".into();
    let v1 = a.update_user_config("hugo", &config).await.unwrap();
    assert_eq!(read(None).await.1, Some(format!("\"{v1}\"")));
    config.preferences.theme = "new".into();
    let v2 = a.update_user_config("hugo", &config).await.unwrap();
    assert_eq!(read(None).await.1, Some(format!("\"{v1}\"")), "B is behind");
    assert_eq!(read(Some(v2)).await, (200, Some(format!("\"{v2}\""))));
    assert_eq!(
        read(None).await.1,
        Some(format!("\"{v2}\"")),
        "and caught up"
    );
    let bad = router
        .clone()
        .oneshot(
            Request::builder()
                .uri(PATH)
                .header("x-min-version", "soon")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}

/// A change through the service records who made it: the token's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_names_the_token_that_made_a_change() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;
    let pool = tiercache_testkit::postgres_env::postgres_pool().await;
    let schema = tiercache_testkit::postgres_env::fresh_schema(&pool).await;
    let storage = userconfig::UserConfigStorage::builder()
        .postgres_source(std::sync::Arc::new(
            tiercache_postgres::PostgresSource::builder()
                .url(tiercache_testkit::env::database_url())
                .schema(schema.clone())
                .build()
                .unwrap(),
        ))
        .build()
        .await
        .unwrap();
    let (token, line) = support::token("web-frontend", "read,write");
    let router = userconfig_cli::router_with_tokens(storage.clone(), &line).unwrap();
    let response = router
        .oneshot(
            Request::builder()
                .method("PUT")
                .uri(PATH)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::from(r#"{"preferences":{"theme":"dark"}}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let history = storage.history("hugo", 10).await.unwrap();
    assert_eq!(history[0].author.as_deref(), Some("web-frontend"));
    tiercache_testkit::postgres_env::drop_schema(&pool, &schema).await;
}
