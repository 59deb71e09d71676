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

/// A chain of a memory tier and `shared` before a source at `url` whose feed streams the WAL
/// where the server allows it (`logical`).
async fn logical_chain(
    url: String,
    shared: FakeTier<String, Value>,
    logical: bool,
) -> TieredCache<String, Value> {
    let source = PostgresSource::<String, Value>::builder()
        .url(url)
        .elect_every(Duration::from_millis(100))
        .logical_decoding(logical)
        .build()
        .unwrap();
    source.migrate().await.unwrap();
    TieredCache::builder()
        .tier(FakeTier::<String, Value>::cache("memory").with_peek())
        .tier(shared)
        .source(source)
        .build()
        .unwrap()
}

/// Whether the switch tells writers to emit logical messages (else they write the log).
async fn writers_emit(admin: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("SELECT last_value = 1 FROM public.tiercache_entries_emit")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// A pool of three connections on `server`, for the test's own statements.
async fn admin_pool(server: &LocalPostgres) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect(&server.url())
        .await
        .unwrap()
}

/// Waits, at most 20 s, until `probe` holds.
async fn eventually<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Where the server allows logical decoding (`wal_level = logical`, a role that may replicate),
/// the elected follower streams the WAL: writers add nothing to the log (they emit a logical
/// message), every chain applies every change, the shared tier once for the fleet; a handover
/// resumes from the slot without losing a change; a slot dropped behind the fleet's back is
/// made anew and every cache flushed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_server_allows_it_the_feed_streams_the_wal() {
    let Some(server) = LocalPostgres::start(&[("wal_level", "logical")]).await else {
        return;
    };
    let shared = FakeTier::<String, Value>::cache("shared");
    let chain = |shared: FakeTier<String, Value>| logical_chain(server.url(), shared, true);
    let mut chains = vec![chain(shared.clone()).await, chain(shared.clone()).await];
    let admin = admin_pool(&server).await;
    let flag = || writers_emit(&admin);
    eventually("never streamed the WAL", || async { flag().await }).await;
    let sql = |statement: String| {
        let admin = admin.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    sql("INSERT INTO public.tiercache_entries (key, value) \
         SELECT 'k' || i, jsonb_build_object('n', i) FROM generate_series(0, 99) i"
        .into())
    .await;
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    let versions = || async {
        let mut out = Vec::new();
        for key in &keys {
            let v: i64 =
                sqlx::query_scalar("SELECT version FROM public.tiercache_entries WHERE key = $1")
                    .bind(key)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            out.push(v as u64);
        }
        out
    };
    let current = |chain: &TieredCache<String, Value>, want: Vec<u64>, what: String| {
        let (chain, keys) = (chain.clone(), keys.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            'again: loop {
                assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
                for (key, want) in keys.iter().zip(&want) {
                    if chain.fetch(key).await.unwrap().version != *want {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue 'again;
                    }
                }
                return;
            }
        }
    };
    let want = versions().await;
    for (i, c) in chains.iter().enumerate() {
        current(c, want.clone(), format!("chain {i} caches the inserts")).await;
    }
    let shared_before = shared.calls().invalidate;
    let applied_before: Vec<u64> = chains.iter().map(|c| c.stats().feed_changes).collect();
    // (A follower that catches up while writers emit messages empties its memory: the log
    // cannot tell it what it missed. The second one did, when it started.)
    let flushed: Vec<u64> = chains.iter().map(|c| c.stats().feed_flushes).collect();
    sql("UPDATE public.tiercache_entries SET value = value || '{\"m\": 1}'".into()).await;
    let want = versions().await;
    for (i, c) in chains.iter().enumerate() {
        current(c, want.clone(), format!("chain {i} serves the update")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM public.tiercache_entries_changes")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(logged, 0, "writers emitted messages, not log entries");
    for (i, c) in chains.iter().enumerate() {
        assert_eq!(
            c.stats().feed_changes - applied_before[i],
            100,
            "chain {i}: once each"
        );
    }
    assert_eq!(
        shared.calls().invalidate - shared_before,
        100,
        "the shared tier once per change for the fleet"
    );

    // The elected chain goes away; changes meanwhile reach the other once it is elected.
    let elected = chains
        .iter()
        .position(|c| c.stats().feed.unwrap().elected)
        .unwrap();
    drop(chains.remove(elected));
    let flushed = flushed[1 - elected];
    sql("UPDATE public.tiercache_entries SET value = value || '{\"m\": 2}'".into()).await;
    let want = versions().await;
    current(
        &chains[0],
        want,
        "the other chain after the handover".into(),
    )
    .await;
    assert!(chains[0].stats().feed.unwrap().elected);
    assert_eq!(
        chains[0].stats().feed_flushes,
        flushed,
        "nothing was lost: no flush"
    );

    // The slot dropped behind the feed's back (its stream ended first): made anew, and every
    // cache flushed once, since what writers emitted meanwhile is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        sql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active".into(),
        )
        .await;
        let dropped =
            sqlx::query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
                .execute(&admin)
                .await;
        if dropped.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot could not be dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sql("UPDATE public.tiercache_entries SET value = value || '{\"m\": 3}'".into()).await;
    let want = versions().await;
    current(
        &chains[0],
        want,
        "the chain after the slot was made anew".into(),
    )
    .await;
    eventually("never flushed for the lost slot", || async {
        chains[0].stats().feed_flushes != flushed
    })
    .await;
}

/// Writers stop emitting messages when the elected follower cannot stream (here: the next one
/// elected has logical decoding off). A writer whose trigger emitted before the change and
/// who commits after the flush that went with it would be lost to every cache: a second flush
/// waits for every transaction that ran at the change. And no slot is left keeping WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_emitted_before_the_feed_stopped_streaming_is_not_lost() {
    let Some(server) = LocalPostgres::start(&[("wal_level", "logical")]).await else {
        return;
    };
    let shared = FakeTier::<String, Value>::cache("shared");
    let streaming = logical_chain(server.url(), shared.clone(), true).await;
    let admin = admin_pool(&server).await;
    let flag = || writers_emit(&admin);
    let until = |what: &'static str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        move || assert!(tokio::time::Instant::now() < deadline, "timed out: {what}")
    };
    let check = until("streaming");
    while !flag().await {
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reading = logical_chain(server.url(), shared.clone(), false).await;
    let key = "alice".to_owned();
    let first = reading
        .update(&key, Arc::new(serde_json::json!({"n": 1})))
        .await
        .unwrap();

    let bob = "bob".to_owned();
    reading
        .update(&bob, Arc::new(serde_json::json!({"n": 1})))
        .await
        .unwrap();
    // A transaction whose snapshot is taken while writers emit, and that writes only after
    // they stopped: what it does must follow the switch as it is then, not as its snapshot
    // saw it (its change would go to a slot nobody reads).
    let mut late = admin.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *late)
        .await
        .unwrap();
    sqlx::query("SELECT count(*) FROM public.tiercache_entries")
        .execute(&mut *late)
        .await
        .unwrap();

    // A writer's trigger runs (and emits) while the flag is set; it commits later.
    let mut writer = admin.begin().await.unwrap();
    let second: i64 = sqlx::query_scalar(
        "UPDATE public.tiercache_entries SET value = '{\"n\": 2}' WHERE key = 'alice' \
         RETURNING version",
    )
    .fetch_one(&mut *writer)
    .await
    .unwrap();

    // The streaming chain goes; the other is elected and reads the log.
    drop(streaming);
    let check = until("the flag cleared");
    while flag().await {
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flushes = reading.stats().feed_flushes;
    assert!(flushes >= 1, "flushed when the flag was cleared");
    // Cached again meanwhile, as it is before the writer commits.
    assert_eq!(reading.fetch(&key).await.unwrap().version, first);
    assert_eq!(reading.fetch(&key).await.unwrap().version, first);
    let bob_before = reading.fetch(&bob).await.unwrap().version;
    let bob_after: i64 = sqlx::query_scalar(
        "UPDATE public.tiercache_entries SET value = '{\"n\": 2}' WHERE key = 'bob' \
         RETURNING version",
    )
    .fetch_one(&mut *late)
    .await
    .unwrap();
    late.commit().await.unwrap();
    let check = until("the late writer's change reached the cache");
    while reading.fetch(&bob).await.unwrap().version == bob_before {
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reading.fetch(&bob).await.unwrap().version, bob_after as u64);
    writer.commit().await.unwrap();

    let check = until("the writer's change reached the cache");
    while reading.fetch(&key).await.unwrap().version != second as u64 {
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reading.stats().feed_flushes > flushes, "by the flush owed");
    // The debt is cleared once the flush is made and told.
    let check = until("no flush owed once made");
    loop {
        let owed: Option<Vec<String>> =
            sqlx::query_scalar("SELECT flush_owed FROM public.tiercache_entries_feed WHERE id = 1")
                .fetch_one(&admin)
                .await
                .unwrap();
        if owed.is_none() {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let check = until("the slot dropped");
    loop {
        let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
            .fetch_one(&admin)
            .await
            .unwrap();
        if slots == 0 {
            break;
        }
        check();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While only other tables change, the slot still lets go of the WAL: transactions with
/// nothing for the feed are not sent at all, so the follower confirms the server's keepalive
/// positions when it has nothing pending (else the slot would keep every byte of the
/// database's WAL until the next change of this table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lets_go_of_the_wal_while_only_other_tables_change() {
    let Some(server) = LocalPostgres::start(&[("wal_level", "logical")]).await else {
        return;
    };
    let chain = logical_chain(server.url(), FakeTier::cache("shared"), true).await;
    let admin = admin_pool(&server).await;
    eventually("never streamed", || async { writers_emit(&admin).await }).await;
    chain
        .update(&"k".to_owned(), Arc::new(serde_json::json!({"n": 1})))
        .await
        .unwrap();
    for statement in [
        "CREATE TABLE other (n int, pad text)",
        "INSERT INTO other SELECT n, repeat('x', 200) FROM generate_series(1, 100000) n",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    let behind = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT pg_wal_lsn_diff($1::pg_lsn, confirmed_flush_lsn)::float8 \
             FROM pg_replication_slots",
        )
        .bind(&written)
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    let at_first = behind().await;
    assert!(at_first > 10e6, "the insert wrote {at_first} bytes of WAL");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = behind().await;
        if left < 64e3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot still holds {left} bytes of WAL written for other tables"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(chain);
}

/// A server that allows slots but no replication connection (`max_wal_senders = 0`): the
/// slot can be made, the stream can never start. Writers must never be told to emit (nobody
/// would read their messages), no slot is left, and a change made with plain SQL reaches the
/// caches through the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_start_never_turns_the_writers_switch() {
    let Some(server) =
        LocalPostgres::start(&[("wal_level", "logical"), ("max_wal_senders", "0")]).await
    else {
        return;
    };
    let shared = FakeTier::<String, Value>::cache("shared");
    let first = logical_chain(server.url(), shared.clone(), true).await;
    let second = logical_chain(server.url(), shared, true).await;
    let admin = admin_pool(&server).await;
    let key = "carol".to_owned();
    let written = first
        .update(&key, Arc::new(serde_json::json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(second.fetch(&key).await.unwrap().version, written);
    // Long enough for the elected follower's attempt to make a slot and fail to stream.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        assert!(!writers_emit(&admin).await, "writers told to emit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let changed: i64 = sqlx::query_scalar(
        "UPDATE public.tiercache_entries SET value = '{\"n\": 2}' WHERE key = 'carol' \
         RETURNING version",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for chain in [&first, &second] {
        while chain.fetch(&key).await.unwrap().version != changed as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the SQL change never reached the caches"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(!writers_emit(&admin).await, "writers told to emit");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(slots, 0, "a slot left keeping WAL for nobody");
}

/// A follower away while the fleet streamed the WAL, and back after the fleet went back to
/// the log: the changes streamed meanwhile were never in the log, so it cannot read them back.
/// Its cursor does not cover the end of that era (recorded with the second flush): it empties
/// its local tiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_away_while_the_fleet_streamed_empties_its_local_tiers() {
    use tiercache_testkit::{FaultProxy, ProxyMode};
    let Some(server) = LocalPostgres::start(&[("wal_level", "logical")]).await else {
        return;
    };
    let shared = FakeTier::<String, Value>::cache("shared");
    let streaming = logical_chain(server.url(), shared.clone(), true).await;
    let admin = admin_pool(&server).await;
    eventually("never streamed", || async { writers_emit(&admin).await }).await;
    let staying = logical_chain(server.url(), shared.clone(), false).await;
    let proxy = FaultProxy::start(&format!("127.0.0.1:{}", server.port())).await;
    let away = logical_chain(
        server
            .url()
            .replace(&server.port().to_string(), &proxy.addr().port().to_string()),
        shared,
        false,
    )
    .await;
    let key = "dave".to_owned();
    let first = streaming
        .update(&key, Arc::new(serde_json::json!({"n": 1})))
        .await
        .unwrap();
    eventually("never cached", || async {
        away.fetch(&key).await.unwrap().version == first
    })
    .await;
    proxy.set_mode(ProxyMode::Reset);
    proxy.kill_connections();
    eventually("never cut off", || async {
        !(away.stats().feed.unwrap().connected)
    })
    .await;
    // Streamed while it is away (a message, not a log entry).
    let second: i64 = sqlx::query_scalar(
        "UPDATE public.tiercache_entries SET value = '{\"n\": 2}' WHERE key = 'dave' \
         RETURNING version",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    eventually("never streamed to the others", || async {
        staying.fetch(&key).await.unwrap().version == second as u64
    })
    .await;
    // The streaming follower goes; the one that stayed reads the log (both flushes made).
    drop(streaming);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (owed, off): (Option<Vec<String>>, Option<String>) = sqlx::query_as(
            "SELECT flush_owed, stream_off FROM public.tiercache_entries_feed WHERE id = 1",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        if !writers_emit(&admin).await && owed.is_none() && off.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the era never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        away.fetch(&key).await.unwrap().version,
        first,
        "stale while away"
    );
    proxy.set_mode(ProxyMode::Pass);
    eventually(
        "the follower that was away still serves what was streamed past it",
        || async { away.fetch(&key).await.unwrap().version == second as u64 },
    )
    .await;
}
