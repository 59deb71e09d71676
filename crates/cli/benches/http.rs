//! The service's own overhead: a memory hit through `GET /v1/users/{id}/config` of
//! `userconfig serve`'s router against a bare axum handler that returns the same bytes, both
//! called in-process (no sockets), in one run; and, to tell where the difference goes, the
//! storage's memory hit and the JSON encoding alone; and the same route with a service token
//! checked (`router_with_tokens`, 20 tokens in the file: each request hashes its token and
//! compares it with all of them), and with an end-user token (JWT, HS256 and ES256) verified.
//!
//! `cargo bench -p userconfig-cli --bench http`

use std::hint::black_box;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use sha2::Digest as _;
use tower::ServiceExt as _;
use userconfig::{UserConfig, UserConfigStorage};

const PATH: &str = "/v1/users/alice/config";

async fn call(router: &axum::Router) -> usize {
    call_as(router, None).await
}

async fn call_as(router: &axum::Router, token: Option<&str>) -> usize {
    let mut request = Request::builder().uri(PATH);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .len()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("userconfig-http-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 20 tokens; the one presented is the last line.
    let tokens: Vec<String> = (0..20).map(|i| format!("uc_bench_token_{i:02}")).collect();
    let file: String = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let hash: String = sha2::Sha256::digest(t.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("t{i} read {hash}\n")
        })
        .collect();
    let presented = tokens[19].clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "alice", "iss": "idp", "aud": "userconfig", "exp": now + 3600
    });
    let secret = b"a shared secret of at least 32 bytes, for HS256".to_vec();
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret).unwrap(),
    )
    .unwrap();
    let mut es_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    es_header.kid = Some("test-es256".into());
    let es256 = jsonwebtoken::encode(
        &es_header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(include_bytes!(
            "../tests/fixtures/es256-test-key.pem"
        ))
        .unwrap(),
    )
    .unwrap();
    let end_users = userconfig_cli::EndUserTokens {
        hs256_secret: Some(secret),
        jwks: Some(include_str!("../tests/fixtures/jwks.json").to_owned()),
        issuer: "idp".into(),
        audience: "userconfig".into(),
        leeway_secs: 30,
    };
    let (ours, bare, storage, checked, jwt) = rt.block_on(async {
        let storage = UserConfigStorage::builder()
            .sqlite_path(dir.join("bench.sqlite3"))
            .build()
            .await
            .unwrap();
        let mut config = UserConfig::default_for("alice");
        config.preferences.theme = "dark".into();
        storage.update_user_config("alice", &config).await.unwrap();
        let ours = userconfig_cli::router(storage.clone());
        // Warm: the next reads are memory hits.
        call(&ours).await;
        let bytes = serde_json::to_vec(&*storage.get_user_config("alice").await.unwrap()).unwrap();
        let bare = axum::Router::new().route(
            "/v1/users/{id}/config",
            get(move || {
                let bytes = bytes.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], bytes) }
            }),
        );
        assert_eq!(call(&ours).await, call(&bare).await, "the same bytes");
        let checked = userconfig_cli::router_with_tokens(storage.clone(), &file).unwrap();
        assert_eq!(
            call_as(&checked, Some(&presented)).await,
            call(&bare).await,
            "the same bytes, the token accepted"
        );
        let jwt = userconfig_cli::router_with_end_users(storage.clone(), Some(&file), &end_users)
            .unwrap();
        for token in [&hs256, &es256] {
            assert_eq!(
                call_as(&jwt, Some(token)).await,
                call(&bare).await,
                "JWT accepted"
            );
        }
        (ours, bare, storage, checked, jwt)
    });
    let mut group = c.benchmark_group("get_config_memory_hit");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("bare_axum_handler", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&bare).await) });
    });
    group.bench_function("userconfig_serve", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&ours).await) });
    });
    group.bench_function("userconfig_serve_with_token", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call_as(&checked, Some(&presented)).await) });
    });
    group.bench_function("userconfig_serve_with_jwt_hs256", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call_as(&jwt, Some(&hs256)).await) });
    });
    group.bench_function("userconfig_serve_with_jwt_es256", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call_as(&jwt, Some(&es256)).await) });
    });
    // What any handler of a stored configuration must do: the memory hit and the JSON.
    group.bench_function("memory_hit_and_json_only", |b| {
        b.to_async(&rt).iter(|| async {
            let fetched = storage.fetch_user_config("alice").await.unwrap();
            let mut body = Vec::with_capacity(4096);
            serde_json::to_writer(&mut body, &*fetched.config).unwrap();
            black_box(body.len())
        });
    });
    group.finish();
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
