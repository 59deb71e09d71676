//! Watching a user's configuration and reading one's own writes anywhere, on the real servers
//! (`REDIS_URL`, `DATABASE_URL`): a watch sees every change, made through this instance,
//! another one or plain SQL, in order, none twice, deletes included; watches are capped and
//! freed with their last handle, also when the caller gives up; and a read at a minimum
//! version is never answered by a cache that has not heard of it.

use std::sync::Arc;
use std::time::Duration;

use tiercache_postgres::PostgresSource;
use tiercache_testkit::{FaultProxy, ProxyMode, env};

use userconfig::{Answer, ConfigWatch, Error, UserConfig, UserConfigStorage, WatchedConfig};

mod support;
use support::{Servers, host_port, themed};

/// The next configuration the watch sees, within 10 s.
async fn next(watch: &mut ConfigWatch, what: &str) -> WatchedConfig {
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .unwrap_or_else(|_| panic!("the watch never saw {what}"))
}

/// Changes seen until one at `version` or newer, each newer than the last.
async fn until(watch: &mut ConfigWatch, version: u64, what: &str) -> Vec<WatchedConfig> {
    let mut seen: Vec<WatchedConfig> = Vec::new();
    while seen.last().is_none_or(|last| last.version < version) {
        let got = next(watch, what).await;
        if let Some(last) = seen.last() {
            assert!(got.version > last.version, "{what}: went back or repeated");
        }
        seen.push(got);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_change_in_order_none_twice_and_a_delete() {
    let s = Servers::new("watch_all").await;
    let a = s.instance().await;
    // Another instance that shares nothing with `a` but the database (no backplane): what `a`
    // learns of its writes, it learns from the feed.
    let b = UserConfigStorage::builder()
        .postgres_source(s.postgres.clone())
        .backplane(false)
        .build()
        .await
        .unwrap();
    let mut watch = a.watch("wendy").await.unwrap();
    let first = watch.current();
    assert_eq!((first.version, first.stored), (0, false), "never written");
    assert_eq!(first.config.user_id, "wendy");

    // Through this instance: seen by the time the write returns.
    let v1 = a
        .update_user_config("wendy", &themed("wendy", "a"))
        .await
        .unwrap();
    assert_eq!(watch.current().version, v1);
    assert_eq!(
        next(&mut watch, "a's write").await.config.preferences.theme,
        "a"
    );

    // Through another instance, then with plain SQL: from the feed.
    let v2 = b
        .update_user_config("wendy", &themed("wendy", "b"))
        .await
        .unwrap();
    let seen = next(&mut watch, "b's write").await;
    assert_eq!(
        (seen.version, seen.config.preferences.theme.as_str()),
        (v2, "b")
    );
    let table = s.table();
    s.sql(format!(
        "UPDATE {table} SET value = jsonb_set(value, '{{preferences,theme}}', '\"sql\"') \
             WHERE key = 'wendy'"
    ))
    .await;
    let v3 = s.db_version("wendy").await;
    let seen = next(&mut watch, "the SQL update").await;
    assert_eq!(
        (seen.version, seen.config.preferences.theme.as_str()),
        (v3, "sql")
    );

    // A delete with SQL: the defaults again, at a newer version.
    s.sql(format!("DELETE FROM {table} WHERE key = 'wendy'"))
        .await;
    let seen = next(&mut watch, "the SQL delete").await;
    assert!(!seen.stored && seen.version > v3, "{seen:?}");
    assert_eq!(
        seen.config.preferences.theme,
        UserConfig::default().preferences.theme
    );

    // A burst of SQL updates: versions only go up, none is seen twice, the last one is seen.
    for n in 0..20 {
        s.sql(
            format!(
                "INSERT INTO {table} (key, value) VALUES ('wendy', '{{\"preferences\": {{\"theme\": \"t{n}\"}}}}') \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
        )
        .await;
    }
    let last = s.db_version("wendy").await;
    let seen = until(&mut watch, last, "the burst").await;
    let end = seen.last().unwrap();
    assert_eq!(
        (end.version, end.config.preferences.theme.as_str()),
        (last, "t19")
    );
    // And nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch.changed())
            .await
            .is_err(),
        "a change seen twice"
    );
    // Every handle of a user shares one registration; a user is watched until the last goes.
    let other = a.watch("wendy").await.unwrap();
    assert_eq!(other.current().version, last);
    assert_eq!(a.watched_users(), 1);
    drop(watch);
    assert_eq!(a.watched_users(), 1);
    drop(other);
    assert_eq!(a.watched_users(), 0);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_capped_and_freed_with_their_last_handle_even_when_the_caller_gives_up() {
    let s = Servers::new("watch_cap").await;
    let a = UserConfigStorage::builder()
        .redis_tier(s.redis.clone())
        .postgres_source(s.postgres.clone())
        .max_watched_users(2)
        .build()
        .await
        .unwrap();
    let one = a.watch("one").await.unwrap();
    let two = a.watch("two").await.unwrap();
    let refused = a.watch("three").await.unwrap_err();
    assert!(
        matches!(refused, Error::TooManyWatches { limit: 2 }),
        "{refused}"
    );
    // Another handle of a watched user is not one more user.
    let again = one.clone();
    assert_eq!(a.watched_users(), 2);
    drop(one);
    drop(again);
    let three = a.watch("three").await.unwrap();
    assert_eq!(three.user_id(), "three");
    drop((two, three));
    assert_eq!(a.watched_users(), 0);
    // A caller that gives up during the first read leaves nothing registered.
    // A caller that gives up during the first read (a time limit shorter than the round
    // trip, through a proxy that delays the database) leaves nothing registered.
    let proxy = FaultProxy::start(&host_port(&env::database_url())).await;
    let through =
        env::database_url().replace(&host_port(&env::database_url()), &proxy.addr().to_string());
    let slow = UserConfigStorage::builder()
        .postgres_source(Arc::new(
            PostgresSource::builder()
                .url(through)
                .schema(s.schema.clone())
                .build()
                .unwrap(),
        ))
        .follow_changes(false)
        .build()
        .await
        .unwrap();
    slow.ping_database().await.unwrap();
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(400)));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), slow.watch("four")).await;
    assert!(gave_up.is_err(), "the first read takes longer than that");
    assert_eq!(slow.watched_users(), 0);
    // A bad id is refused before any I/O.
    assert!(a.watch("").await.unwrap_err().is_invalid_input());
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_at_a_minimum_version_is_never_answered_by_a_cache_behind_it() {
    let s = Servers::new("ryw").await;
    let a = s.instance().await;
    // `b` hears of nothing: no feed, no backplane, no Redis (a follower held back forever).
    let b = UserConfigStorage::builder()
        .postgres_source(s.postgres.clone())
        .follow_changes(false)
        .backplane(false)
        .build()
        .await
        .unwrap();
    let v1 = a
        .update_user_config("rita", &themed("rita", "old"))
        .await
        .unwrap();
    assert_eq!(b.fetch_user_config("rita").await.unwrap().version, v1);
    let v2 = a
        .update_user_config("rita", &themed("rita", "new"))
        .await
        .unwrap();
    // Without a minimum, `b` serves what its memory holds: the setup is real.
    let stale = b.fetch_user_config("rita").await.unwrap();
    assert_eq!((stale.version, stale.answered_by), (v1, Answer::Memory));
    // With one, the database answers, and fills `b`'s memory.
    let got = b.fetch_user_config_at_least("rita", v2).await.unwrap();
    assert_eq!((got.version, got.answered_by), (v2, Answer::Database));
    assert_eq!(got.config.preferences.theme, "new");
    let now = b.fetch_user_config("rita").await.unwrap();
    assert_eq!((now.version, now.answered_by), (v2, Answer::Memory));
    // A minimum the cached copy meets costs nothing more.
    let cheap = b.fetch_user_config_at_least("rita", v1).await.unwrap();
    assert_eq!(cheap.answered_by, Answer::Memory);
    // Deleted since: the defaults, from the database (nothing newer exists).
    a.delete_user_config("rita").await.unwrap();
    let gone = b.fetch_user_config_at_least("rita", v2 + 1).await.unwrap();
    assert!(!gone.stored);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_carries_every_writers_change_once_in_order_and_resumes() {
    let s = Servers::new("change_log").await;
    let a = s.instance().await;
    let b = s.instance().await;
    let mut reader = a.changes(None).unwrap();
    let next = async |reader: &mut userconfig::ChangeReader| {
        tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("a change within 10 s")
            .unwrap()
    };
    // Its own write (seen from the write and again from the feed), another instance's, and
    // plain SQL: each once.
    let v1 = a
        .update_user_config("lou", &themed("lou", "a"))
        .await
        .unwrap();
    let v2 = b
        .update_user_config("max", &themed("max", "b"))
        .await
        .unwrap();
    let table = s.table();
    s.sql(format!("DELETE FROM {table} WHERE key = 'lou'"))
        .await;
    let seen: Vec<(String, u64, userconfig::ChangeOp)> = {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let c = next(&mut reader).await;
            seen.push((c.user_id, c.version, c.op));
        }
        seen
    };
    assert_eq!(seen[0], ("lou".into(), v1, userconfig::ChangeOp::Write));
    assert_eq!(seen[1], ("max".into(), v2, userconfig::ChangeOp::Write));
    assert_eq!(
        (seen[2].0.as_str(), seen[2].2),
        ("lou", userconfig::ChangeOp::Delete)
    );
    assert!(seen[2].1 > v2);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), reader.next())
            .await
            .is_err(),
        "nothing twice"
    );
    // Resumed from a cursor: what followed it; another storage's cursor: re-sync.
    let cursor = reader.cursor();
    let v3 = a
        .update_user_config("max", &themed("max", "c"))
        .await
        .unwrap();
    let mut resumed = a.changes(Some(&cursor)).unwrap();
    assert_eq!(next(&mut resumed).await.version, v3);
    assert!(matches!(b.changes(Some(&cursor)), Err(Error::CursorTooOld)));
    s.cleanup().await;
}
