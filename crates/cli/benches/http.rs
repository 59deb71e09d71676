//! The service's own overhead: a memory hit through `GET /v1/users/{id}/config` of
//! `userconfig serve`'s router against a bare axum handler that returns the same bytes, both
//! called in-process (no sockets), in one run; and, to tell where the difference goes, the
//! storage's memory hit and the JSON encoding alone.
//!
//! `cargo bench -p userconfig-cli --bench http`

use std::hint::black_box;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use tower::ServiceExt as _;
use userconfig::{UserConfig, UserConfigStorage};

const PATH: &str = "/v1/users/alice/config";

async fn call(router: &axum::Router) -> usize {
    let request = Request::builder().uri(PATH).body(Body::empty()).unwrap();
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
    let (ours, bare, storage) = rt.block_on(async {
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
        (ours, bare, storage)
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
