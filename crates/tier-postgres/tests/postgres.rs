//! The PostgreSQL tier's own cases against the real local server (`DATABASE_URL`), each test
//! in its own schema (the shared contract is in `contract.rs`).

use std::time::Duration;

use sqlx::{AssertSqlSafe, SqlSafeStr};
use tiercache_core::{Error, Source, Written};
use tiercache_postgres::PostgresSource;
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::env::unique_name;
use tiercache_testkit::{env, postgres_env};

type Tier = PostgresSource<String, ContractValue>;

fn tier(schema: &str) -> Tier {
    PostgresSource::builder()
        .url(env::database_url())
        .schema(schema)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_row_that_does_not_decode_is_an_error_naming_the_key() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    t.write(&"alice".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {} SET value = '{{\"name\": 5}}' WHERE key = 'alice'",
        t.qualified_table()
    )))
    .execute(&pool)
    .await
    .unwrap();
    let err = t.get(&"alice".into()).await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.starts_with("stored value for key `alice` does not decode: "),
        "{source}"
    );
    let err = t
        .get_many(&["bob".into(), "alice".into()])
        .await
        .unwrap_err();
    assert!(err.is_corrupt());
    assert_eq!(t.stats().corrupt, 2);
    // The bad row got a version of its own from the database (the trigger numbers every
    // writer's change); a write replaces it and numbers on from it.
    let v = t
        .write(&"alice".into(), contract::value(2), None)
        .await
        .map(Written::version)
        .unwrap();
    assert_eq!(v, 3, "1: the first write, 2: the SQL update, 3: this write");
    assert_eq!(t.get(&"alice".into()).await.unwrap().unwrap().version, 3);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_server_that_refuses_connections_is_a_transient_unavailable_error() {
    // Default settings: sqlx retries a refused connection until the acquire time limit (1 s),
    // then the tier's own connection attempt finds the server refusing.
    let t: Tier = PostgresSource::builder()
        .url("postgres://postgres:s3cret-sentinel@127.0.0.1:1/test")
        .build()
        .expect("building needs no server");
    let err = tokio::time::timeout(Duration::from_secs(10), t.get(&"a".into()))
        .await
        .expect("a down database must not hang a call")
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_transient());
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        text.contains("refused") || text.contains("unreachable"),
        "{text}"
    );
    assert!(!text.contains("s3cret-sentinel"), "{text}");
    // Right after, calls fail at once rather than each waiting out the pool's time limit.
    let err = t
        .write(&"a".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap_err();
    assert!(err.is_transient());
    assert!(t.stats().errors >= 2);
}

/// A server that refuses connections: every kind of call fails with a transient error that
/// says so, and each asks the server again (one probe each: the tier keeps no fail-fast window
/// of its own; the chain's breaker decides when to stop asking: `userconfig/tests/faults.rs`,
/// `a_down_server_is_asked_at_most_once_per_cool_down`).
#[tokio::test]
async fn an_unreachable_server_fails_each_call_and_each_asks_again() {
    let t: Tier = PostgresSource::builder()
        .url("postgres://postgres@127.0.0.1:1/test")
        .acquire_timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let unreachable = |e: &Error| {
        e.is_transient()
            && std::error::Error::source(e).is_some_and(|s| {
                s.to_string()
                    .contains("the database refused or dropped the connection")
            })
    };
    for probes in 1..=2 {
        let err = t.get(&"a".into()).await.unwrap_err();
        assert!(unreachable(&err), "{err:?}");
        assert_eq!(t.probes(), probes, "asked the server again");
    }
    let err = t
        .write(&"a".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap_err();
    assert!(unreachable(&err), "{err:?}");
    let err = t.get_many(&["a".into(), "b".into()]).await.unwrap_err();
    assert!(unreachable(&err), "{err:?}");
    assert_eq!(t.probes(), 4);
    assert_eq!(t.stats().errors, 4);
}

#[tokio::test]
async fn migrations_are_idempotent_and_tables_are_isolated() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let a = tier(&schema);
    let b = tier(&schema);
    a.migrate().await.unwrap();
    b.migrate().await.unwrap();
    a.write(&"k".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    assert_eq!(b.get(&"k".into()).await.unwrap().unwrap().version, 1);
    // Another table in the same schema is another store.
    let other: Tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(&schema)
        .table("other_entries")
        .build()
        .unwrap();
    assert!(other.get(&"k".into()).await.unwrap().is_none());
    assert_eq!(
        other
            .write(&"k".into(), contract::value(2), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(a.get(&"k".into()).await.unwrap().unwrap().version, 1);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_slow_statement_is_a_timeout() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    // Migrated under the default time limit first: creating the functions and triggers can
    // take longer than 200 ms on a loaded machine (it failed so once in CI).
    tier(&schema).migrate().await.unwrap();
    let t: Tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(&schema)
        .statement_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    t.write(&"k".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    // Hold the row's lock so that the next write waits past the statement time limit.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE key = 'k' FOR UPDATE",
        t.qualified_table()
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let err = t
        .write(&"k".into(), contract::value(2), None)
        .await
        .map(Written::version)
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(err.is_transient());
    tx.rollback().await.unwrap();
    // The pool is not poisoned by the cancelled statement.
    assert_eq!(
        t.write(&"k".into(), contract::value(3), None)
            .await
            .map(Written::version)
            .unwrap(),
        2
    );
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn schemas_keep_tables_of_the_same_name_apart() {
    let pool = postgres_env::postgres_pool().await;
    let (one, two) = (
        postgres_env::fresh_schema(&pool).await,
        postgres_env::fresh_schema(&pool).await,
    );
    let (a, b) = (tier(&one), tier(&two));
    assert_eq!(
        a.write(&"k".into(), contract::value(1), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(
        a.write(&"k".into(), contract::value(2), None)
            .await
            .map(Written::version)
            .unwrap(),
        2
    );
    assert!(b.get(&"k".into()).await.unwrap().is_none());
    assert_eq!(
        b.write(&"k".into(), contract::value(3), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(a.get(&"k".into()).await.unwrap().unwrap().version, 2);
    postgres_env::drop_schema(&pool, &one).await;
    postgres_env::drop_schema(&pool, &two).await;
}

#[tokio::test]
async fn a_missing_schema_is_created_and_long_table_names_work() {
    let pool = postgres_env::postgres_pool().await;
    // Not created beforehand: the first call's migrations create it.
    let schema = unique_name("created");
    let long_table = format!("t{}", "x".repeat(62));
    let t: Tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(&schema)
        .table(&long_table)
        .name("long")
        .build()
        .unwrap();
    assert!(t.get(&"k".into()).await.unwrap().is_none());
    assert_eq!(
        t.write(&"k".into(), contract::value(1), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    t.migrate().await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = $1 ORDER BY table_name",
    )
    .bind(&schema)
    .fetch_all(&pool)
    .await
    .unwrap();
    // The table, its change log, its history, the feed's state, the migrations' bookkeeping:
    // names that would be too long are shortened with a hash.
    assert_eq!(tables.len(), 5, "{tables:?}");
    assert!(tables.contains(&long_table), "{tables:?}");
    assert!(tables.iter().all(|t| t.len() <= 63), "{tables:?}");
    assert!(tables.iter().any(|t| t.ends_with("_changes")), "{tables:?}");
    assert!(tables.iter().any(|t| t.ends_with("_history")), "{tables:?}");
    assert!(
        tables
            .iter()
            .any(|t| t.starts_with("_tiercache_migrations_")),
        "{tables:?}"
    );
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn migrations_that_failed_are_retried_on_the_next_call() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    // A bookkeeping table of the wrong shape makes the migrations fail...
    let bookkeeping = format!("\"{schema}\"._tiercache_migrations_tiercache_entries");
    sqlx::query(AssertSqlSafe(format!("CREATE TABLE {bookkeeping} (x int)")))
        .execute(&pool)
        .await
        .unwrap();
    let t = tier(&schema);
    let err = t
        .write(&"k".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap_err();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    // Still failing, the same way: a failed run must not leave sqlx's advisory lock held on a
    // pooled connection (the next run would wait on it until the statement time limit).
    let again = t.get(&"k".into()).await.unwrap_err();
    assert!(matches!(again, Error::Backend { .. }), "{again:?}");
    let other_schema = postgres_env::fresh_schema(&pool).await;
    tier(&other_schema).migrate().await.unwrap();
    postgres_env::drop_schema(&pool, &other_schema).await;
    // ...and once it is fixed, the next call migrates and goes on.
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {bookkeeping}")))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        t.write(&"k".into(), contract::value(1), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    assert_eq!(t.stats().errors, 2);
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn nul_characters_are_invalid_input_not_a_backend_failure() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    // What the tier saves callers from: jsonb refuses an escaped NUL.
    let refused = sqlx::query("SELECT $1::jsonb")
        .bind(r#""a\u0000b""#)
        .execute(&pool)
        .await;
    assert!(refused.is_err());

    let mut with_nul = (*contract::value(1)).clone();
    with_nul.name = "a\0b".into();
    let err = t
        .write(&"k".into(), with_nul.into(), None)
        .await
        .map(Written::version)
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    let err = t.get(&"a\0b".into()).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(t.get(&"k".into()).await.unwrap().is_none());
    // A backslash followed by the text `u0000` is an ordinary value.
    let mut lookalike = (*contract::value(2)).clone();
    lookalike.name = "a\\u0000b".into();
    let lookalike = std::sync::Arc::new(lookalike);
    assert_eq!(
        t.write(&"k".into(), lookalike.clone(), None)
            .await
            .map(Written::version)
            .unwrap(),
        1
    );
    let got = t.get(&"k".into()).await.unwrap().unwrap();
    assert_eq!(*got.value.unwrap(), *lookalike);
    postgres_env::drop_schema(&pool, &schema).await;
}

/// Ends every server session whose last statement named `schema` (this test's tier's only),
/// and returns how many it ended.
async fn terminate_sessions_on(pool: &sqlx::PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'tiercache' AND strpos(query, $1) > 0 \
         AND pid <> pg_backend_pid()) AS ended",
    )
    .bind(schema)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn connections_the_server_ended_are_replaced_without_failing_a_call() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    t.write(&"k".into(), contract::value(1), None)
        .await
        .map(Written::version)
        .unwrap();
    // Several pooled connections, each of which has run a statement on this schema.
    let keys: Vec<String> = (0..4).map(|i| format!("k{i}")).collect();
    for _ in 0..3 {
        let reads = tokio::join!(
            t.get(&keys[0]),
            t.get(&keys[1]),
            t.get(&keys[2]),
            t.get(&keys[3])
        );
        for read in [reads.0, reads.1, reads.2, reads.3] {
            read.unwrap();
        }
    }
    // The server ends them all while they sit idle in the pool (a restart, an idle-session
    // killer): the next read and the next write get through on fresh connections.
    let ended = terminate_sessions_on(&pool, &schema).await;
    assert!(ended >= 2, "ended {ended} sessions");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.get(&"k".into()).await.unwrap().unwrap().version, 1);
    assert!(terminate_sessions_on(&pool, &schema).await >= 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = t.get_many(&["k".into(), "nope".into()]).await.unwrap();
    assert!(got[0].is_some() && got[1].is_none());
    assert!(terminate_sessions_on(&pool, &schema).await >= 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        t.write(&"k".into(), contract::value(2), None)
            .await
            .map(Written::version)
            .unwrap(),
        2
    );
    assert_eq!(t.stats().errors, 0);
    postgres_env::drop_schema(&pool, &schema).await;
}

/// Holds an exclusive lock on the tier's table from a connection of its own, until dropped
/// (the transaction rolls back): the tier's statements on it wait.
async fn lock_table(
    pool: &sqlx::PgPool,
    table: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pool_is_probed_once_not_once_per_waiter() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t: Tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(&schema)
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(500))
        .statement_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    t.migrate().await.unwrap();
    let lock = lock_table(&pool, &t.qualified_table()).await;
    // The pool's only connection waits on the lock; twenty callers wait for the pool.
    let holder = tokio::spawn({
        let t = std::sync::Arc::new(t);
        let waiters = t.clone();
        async move {
            let held = tokio::spawn(async move { t.get(&"held".into()).await });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let calls: Vec<_> = (0..20)
                .map(|i| {
                    let t = waiters.clone();
                    tokio::spawn(async move { t.get(&format!("k{i}")).await })
                })
                .collect();
            let mut busy = 0;
            for call in calls {
                let err = call.await.unwrap().unwrap_err();
                assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
                busy += 1;
            }
            (held, busy, waiters.probes())
        }
    });
    let (held, busy, probes) = holder.await.unwrap();
    assert_eq!(busy, 20);
    // One probe (two if the callers' time-outs straddle the quarter second after the first),
    // not one per waiter.
    assert!(probes <= 2, "{probes} probe connections for twenty waiters");
    drop(lock);
    held.await.unwrap().unwrap();
    postgres_env::drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_connection_dies_after_it_was_sent_is_interrupted() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = std::sync::Arc::new(tier(&schema));
    t.migrate().await.unwrap();
    let lock = lock_table(&pool, &t.qualified_table()).await;
    let write = tokio::spawn({
        let t = t.clone();
        async move {
            t.write(&"k".into(), contract::value(1), None)
                .await
                .map(Written::version)
        }
    });
    // The write is at the server, waiting for the lock: its session ends there (and only a
    // session waiting on the lock, not one still connecting or being pinged).
    let mut ended = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ended = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'tiercache' AND strpos(query, $1) > 0 \
             AND wait_event_type = 'Lock') AS ended",
        )
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
        if ended > 0 {
            break;
        }
    }
    assert!(ended > 0, "the write's session was found");
    let err = write.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err:?}");
    assert!(err.outcome_unknown());
    drop(lock);
    postgres_env::drop_schema(&pool, &schema).await;
}

/// A table populated before the versions came from the database (migration 0001 only, each
/// key numbered on its own) keeps every key's versions increasing when it is upgraded: the
/// next write of any key is above every version a cache may hold.
#[tokio::test]
async fn upgrading_a_populated_table_keeps_every_keys_versions_increasing() {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    // What an earlier release created: the first migration, recorded as the tier records it.
    let first = include_str!("../migrations/0001_create_entries.sql")
        .replace("{table}", &t.qualified_table());
    let mut old = Migrator::with_migrations(vec![Migration::new(
        1,
        "create entries".into(),
        MigrationType::Simple,
        AssertSqlSafe(first).into_sql_str(),
        false,
    )]);
    old.dangerous_set_table_name(format!(
        "\"{schema}\".\"_tiercache_migrations_tiercache_entries\""
    ));
    old.run(&pool).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {} (key, value, version) VALUES \
         ('a', '{{\"name\": \"a\", \"n\": 1, \"tags\": [], \"weights\": {{}}}}', 7), \
         ('b', '{{\"name\": \"b\", \"n\": 2, \"tags\": [], \"weights\": {{}}}}', 3)",
        t.qualified_table()
    )))
    .execute(&pool)
    .await
    .unwrap();
    // The upgrade runs on first use.
    assert_eq!(t.get(&"a".into()).await.unwrap().unwrap().version, 7);
    let b = t
        .write(&"b".into(), contract::value(3), None)
        .await
        .unwrap()
        .version();
    assert!(b > 7, "b's next version {b} is above every stored version");
    let a = t
        .write(&"a".into(), contract::value(4), None)
        .await
        .unwrap()
        .version();
    assert!(a > b, "{a} after {b}");
    postgres_env::drop_schema(&pool, &schema).await;
}

/// Every writer's change gets its version from the database: a row inserted, updated and
/// deleted with plain SQL is numbered like the crate's own writes, and recorded in the change
/// log; an update that leaves the value as it is changes nothing.
#[tokio::test]
async fn plain_sql_writers_get_versions_and_log_entries_too() {
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let t = tier(&schema);
    t.migrate().await.unwrap();
    let table = t.qualified_table();
    let sql = |s: String| {
        let pool = pool.clone();
        async move { sqlx::query(AssertSqlSafe(s)).execute(&pool).await.unwrap() }
    };
    // As SQL literals (the values hold a single quote).
    let literal = |n| {
        serde_json::to_string(&*contract::value(n))
            .unwrap()
            .replace('\'', "''")
    };
    let json = literal(1);
    sql(format!(
        "INSERT INTO {table} (key, value) VALUES ('k', '{json}')"
    ))
    .await;
    let v1 = t.get(&"k".into()).await.unwrap().unwrap().version;
    let mine = t
        .write(&"k".into(), contract::value(2), None)
        .await
        .unwrap()
        .version();
    assert!(mine > v1);
    let json2 = literal(2);
    // The same value again, with SQL: nothing changes.
    let same = sql(format!(
        "UPDATE {table} SET value = '{json2}' WHERE key = 'k'"
    ))
    .await;
    assert_eq!(same.rows_affected(), 0, "an equal value is not written");
    assert_eq!(t.get(&"k".into()).await.unwrap().unwrap().version, mine);
    sql(format!(
        "UPDATE {table} SET value = '{json}' WHERE key = 'k'"
    ))
    .await;
    let v3 = t.get(&"k".into()).await.unwrap().unwrap().version;
    assert!(v3 > mine);
    sql(format!("DELETE FROM {table} WHERE key = 'k'")).await;
    sql(format!(
        "INSERT INTO {table} (key, value) VALUES ('k', '{json}')"
    ))
    .await;
    let v5 = t.get(&"k".into()).await.unwrap().unwrap().version;
    assert!(
        v5 > v3 + 1,
        "the delete had a version of its own: {v5} after {v3}"
    );
    let log: Vec<(String, i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT key, version, op::text FROM {} ORDER BY version",
        t.changes_table()
    )))
    .fetch_all(&pool)
    .await
    .unwrap();
    let ops: Vec<&str> = log.iter().map(|(_, _, op)| op.as_str()).collect();
    assert_eq!(ops, ["I", "U", "U", "D", "I"], "{log:?}");
    let versions: Vec<i64> = log.iter().map(|(_, v, _)| *v).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(*versions.last().unwrap() as u64, v5);
    postgres_env::drop_schema(&pool, &schema).await;
}

/// The least-privilege set-up of docs/operations.md: the migrations run once with a privileged
/// role, `grant_to` gives the service's role what it needs, and a tier with that role and
/// `run_migrations(false)` reads, writes, deletes, compare-and-sets and follows the change
/// feed, while it may not create anything.
#[tokio::test]
async fn a_role_that_may_only_read_and_write_serves_once_migrated_and_granted() {
    use std::str::FromStr as _;

    use sqlx::postgres::PgConnectOptions;
    use tiercache_core::Change;

    let admin_pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&admin_pool).await;
    let role = unique_name("svc");
    sqlx::query(AssertSqlSafe(format!("CREATE ROLE \"{role}\" LOGIN")))
        .execute(&admin_pool)
        .await
        .unwrap();
    let as_role = || -> Tier {
        let options = PgConnectOptions::from_str(&env::database_url())
            .unwrap()
            .username(&role);
        PostgresSource::builder()
            .connect_options(options)
            .schema(schema.clone())
            .run_migrations(false)
            // Its elected follower prunes what is older than this: the test waits for it.
            .change_retention(Duration::from_millis(300))
            .build()
            .unwrap()
    };
    let value = contract::value;

    // A tier that may not migrate, on a table nobody migrated: an error that says what to run.
    let unmigrated: Tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(schema.clone())
        .run_migrations(false)
        .build()
        .unwrap();
    let error = unmigrated.get(&"k".to_owned()).await.unwrap_err();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    assert!(text.contains("userconfig migrate"), "{text}");
    assert!(!error.is_transient(), "{error}");

    let admin = tier(&schema);
    admin.migrate().await.unwrap();
    // Without the grants the service's role can do nothing.
    assert!(as_role().get(&"k".to_owned()).await.is_err());
    admin.grant_to(&role).await.unwrap();
    assert!(admin.grant_to("Robert'); DROP").await.is_err());

    let service = as_role();
    let mut feed = service.follow().expect("the tier has a change feed");
    let key = "alice".to_owned();
    let Written::Changed(v1) = service.write(&key, value(1), None).await.unwrap() else {
        panic!("a first write changes");
    };
    assert_eq!(service.get(&key).await.unwrap().unwrap().version, v1);
    let conflict = service.write(&key, value(2), Some(v1 + 100)).await;
    assert!(
        matches!(conflict, Err(Error::Conflict { .. })),
        "{conflict:?}"
    );
    // A change by someone else reaches the service's follower.
    let Written::Changed(v2) = admin.write(&key, value(3), Some(v1)).await.unwrap() else {
        panic!("the admin's write changes");
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'seen: loop {
        let batch = tokio::time::timeout_at(deadline, feed.recv())
            .await
            .expect("the change arrives")
            .expect("the feed is open");
        for change in batch.changes {
            if matches!(&change, Change::Key { key: k, version, .. } if *k == key && *version == Some(v2))
            {
                break 'seen;
            }
        }
    }
    // The follower waits for each batch to be taken: keep taking them.
    let draining = tokio::spawn(async move { while feed.recv().await.is_some() {} });
    let deleted = service.delete(&key, Some(v2)).await.unwrap();
    assert!(
        matches!(deleted, Written::Changed(v) if v > v2),
        "{deleted:?}"
    );
    assert!(service.get(&key).await.unwrap().is_none());
    // The service's follower (the elected one: it is alone) prunes the log as the service's
    // role: every entry, once a retention has passed.
    let changes = service.changes_table();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {changes}")))
                .fetch_one(&admin_pool)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service's follower never pruned the log ({left} entries left)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.prune_changes().await.unwrap();

    // And nothing else: the role may not create objects in the schema.
    let options = PgConnectOptions::from_str(&env::database_url())
        .unwrap()
        .username(&role);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let create = sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".intruder (id int)"
    )))
    .execute(&pool)
    .await;
    assert!(create.is_err(), "the service role created a table");
    pool.close().await;
    drop(service);
    draining.abort();

    postgres_env::drop_schema(&admin_pool, &schema).await;
    sqlx::query(AssertSqlSafe(format!("DROP OWNED BY \"{role}\"")))
        .execute(&admin_pool)
        .await
        .unwrap();
    sqlx::query(AssertSqlSafe(format!("DROP ROLE \"{role}\"")))
        .execute(&admin_pool)
        .await
        .unwrap();
}
