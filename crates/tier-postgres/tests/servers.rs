//! The source against PostgreSQL servers this test starts itself
//! ([`LocalPostgres`](tiercache_testkit::postgres_env::LocalPostgres)): never the shared one for
//! a standby, a promotion or a server setting.

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{Error, Source, TieredCache};
use tiercache_postgres::PostgresSource;
use tiercache_testkit::postgres_env::LocalPostgres;
use tiercache_testkit::{Captured, FakeTier};

type Value = serde_json::Value;

fn source(url: String) -> PostgresSource<String, Value> {
    PostgresSource::builder().url(url).build().unwrap()
}

/// A source pointed at a standby in recovery: a write is a clear, typed error (not a retry,
/// not a loop), reads work, and the follower says once, loudly, that it cannot follow a
/// standby, instead of reconnecting in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_a_typed_error_for_writes_and_a_follower_that_waits() {
    let Some(primary) = LocalPostgres::start(&[]).await else {
        return;
    };
    let on_primary = source(primary.url());
    on_primary.migrate().await.unwrap();
    let version = on_primary
        .write(
            &"alice".to_owned(),
            Arc::new(serde_json::json!({"n": 1})),
            None,
        )
        .await
        .unwrap()
        .version();
    let standby = primary.standby().await;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .with_ansi(false)
        .finish();
    // Global: the follower logs from the runtime's threads. (One test in this binary sets it.)
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let on_standby = Arc::new(source(standby.url()));
    // It replays the primary: alice arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match on_standby.get(&"alice".to_owned()).await {
            Ok(Some(entry)) if entry.version == version => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the standby never caught up"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = on_standby
        .write(
            &"alice".to_owned(),
            Arc::new(serde_json::json!({"n": 2})),
            None,
        )
        .await
        .unwrap_err();
    assert!(refused.is_read_only(), "{refused:?}");
    assert!(
        !refused.is_transient(),
        "a standby is no fault to retry: {refused:?}"
    );
    assert!(matches!(refused, Error::ReadOnly { .. }));

    let chain = TieredCache::builder()
        .tier(FakeTier::<String, Value>::cache("memory").with_peek())
        .source(on_standby.clone())
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let feed = chain.stats().feed.unwrap();
    assert!(!feed.connected, "a follower of a standby is not following");
    let logs = captured.text();
    let said = logs.matches("standby in recovery").count();
    assert_eq!(said, 1, "said once in two seconds, not in a loop:\n{logs}");
    assert_eq!(
        chain.get(&"alice".to_owned()).await.unwrap().as_deref(),
        Some(&serde_json::json!({"n": 1})),
        "reads are served"
    );
}

/// A failover: the primary dies, its standby is promoted (a new timeline), and the address the
/// chains use now leads there. Every follower notices the database's history changed, flushes
/// once, and carries on: the chains serve the promoted server's data and its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_every_follower_flushes_once_and_carries_on() {
    use tiercache_testkit::FaultProxy;

    let Some(primary) = LocalPostgres::start(&[]).await else {
        return;
    };
    let standby = primary.standby().await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", primary.port())).await;
    let url = format!("postgres://postgres@{}/postgres", proxy.addr());
    let shared = FakeTier::<String, Value>::cache("shared");
    let mut chains = Vec::new();
    for _ in 0..2 {
        let source = PostgresSource::<String, Value>::builder()
            .url(url.clone())
            .elect_every(Duration::from_millis(100))
            .build()
            .unwrap();
        source.migrate().await.unwrap();
        chains.push(
            TieredCache::builder()
                .tier(FakeTier::<String, Value>::cache("memory").with_peek())
                .tier(shared.clone())
                .source(source)
                .build()
                .unwrap(),
        );
    }
    let writer = source(primary.url());
    let key = "alice".to_owned();
    let v1 = writer
        .write(&key, Arc::new(serde_json::json!({"n": 1})), None)
        .await
        .unwrap()
        .version();
    let eventually = |what: &'static str, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for chain in &chains {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while chain.fetch(&key).await.unwrap().version != v1 {
            assert!(tokio::time::Instant::now() < deadline, "cached");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eventually("the standby caught up", &|| true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flushed: Vec<u64> = chains.iter().map(|c| c.stats().feed_flushes).collect();

    // The failover.
    primary.stop();
    standby.promote();
    proxy
        .set_upstream(&format!("127.0.0.1:{}", standby.port()))
        .await;
    proxy.kill_connections();
    let promoted = source(standby.url());
    let v2 = promoted
        .write(&key, Arc::new(serde_json::json!({"n": 2})), None)
        .await
        .unwrap()
        .version();
    for (i, chain) in chains.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = chain.fetch(&key).await;
            if let Ok(got) = &got
                && got.version == v2
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chain {i} never served the promoted server's change: {got:?}, {:?}",
                chain.stats()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = chain.stats();
        assert_eq!(stats.feed_flushes, flushed[i] + 1, "chain {i} flushed once");
        assert!(stats.feed.unwrap().connected, "chain {i} follows again");
    }
    // And carries on: the next change reaches every chain without another flush.
    let v3 = promoted
        .write(&key, Arc::new(serde_json::json!({"n": 3})), None)
        .await
        .unwrap()
        .version();
    for (i, chain) in chains.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while chain.fetch(&key).await.unwrap().version != v3 {
            assert!(tokio::time::Instant::now() < deadline, "chain {i} after");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(chain.stats().feed_flushes, flushed[i] + 1, "chain {i}");
    }
}
