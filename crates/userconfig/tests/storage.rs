//! `UserConfigStorage` over an in-process source: the seed's API, defaults, validation before
//! any I/O, and the stats shape. (The same flows against Redis and PostgreSQL are in
//! `servers.rs`.)

use std::sync::Arc;

use serde_json::json;
use tiercache_testkit::FakeSource;
use userconfig::{Answer, Error, UserConfig, UserConfigStorage};

async fn storage() -> (UserConfigStorage, FakeSource<String, UserConfig>) {
    let db = FakeSource::new("db");
    let storage = UserConfigStorage::builder()
        .source(Arc::new(db.clone()))
        .build()
        .await
        .unwrap();
    (storage, db)
}

#[tokio::test]
async fn an_unknown_user_gets_the_default_config() {
    let (s, db) = storage().await;
    let c = s.get_user_config("newcomer").await.unwrap();
    assert_eq!(*c, UserConfig::default_for("newcomer"));
    let again = s.fetch_user_config("newcomer").await.unwrap();
    assert_eq!(again.version, 0);
    assert_eq!(
        again.answered_by,
        Answer::Memory,
        "the not-found was cached"
    );
    assert_eq!(db.calls().get, 1);
}

#[tokio::test]
async fn a_bulk_read_answers_in_order_with_one_database_call_for_the_misses() {
    let (s, db) = storage().await;
    let mut c = UserConfig::default_for("bob");
    c.preferences.theme = "dark".into();
    s.update_user_config("bob", &c).await.unwrap();
    s.clear_memory_cache().await;
    let got = s
        .get_user_configs(&["carol", "bob", "carol"])
        .await
        .unwrap();
    let themes: Vec<&str> = got.iter().map(|c| c.preferences.theme.as_str()).collect();
    assert_eq!(
        themes,
        ["system", "dark", "system"],
        "in order, a key asked twice answered twice"
    );
    assert_eq!(
        got[0].user_id, "carol",
        "an unknown user gets her own defaults"
    );
    assert_eq!(db.calls().get_many, 1, "one batch for the misses");
    assert_eq!(db.calls().get, 0);
    // A bad id anywhere refuses the whole batch before any I/O.
    let before = db.calls();
    assert!(matches!(
        s.get_user_configs(&["dave", "\u{1}bad"]).await,
        Err(Error::InvalidUserId { .. })
    ));
    assert_eq!(db.calls().get_many, before.get_many);
}

#[tokio::test]
async fn update_then_get_returns_the_update_from_memory() {
    let (s, db) = storage().await;
    let mut c = (*s.get_user_config("alice").await.unwrap()).clone();
    c.preferences.theme = "dark".into();
    let v = s.update_user_config("alice", &c).await.unwrap();
    assert_eq!(v, 1);
    let got = s.fetch_user_config("alice").await.unwrap();
    assert_eq!(got.answered_by, Answer::Memory);
    assert_eq!(got.config.preferences.theme, "dark");
    assert_eq!(got.version, 1);
    assert_eq!(db.version(&"alice".to_string()), Some(1));
}

#[tokio::test]
async fn invalidate_and_clear_memory_send_the_next_read_to_the_database() {
    let (s, db) = storage().await;
    s.update_user_config("bob", &UserConfig::default_for("bob"))
        .await
        .unwrap();
    s.clear_memory_cache().await;
    assert_eq!(s.get_cache_stats().memory_cache.entries, 0);
    assert_eq!(
        s.fetch_user_config("bob").await.unwrap().answered_by,
        Answer::Database
    );
    s.invalidate_user_config_cache("bob").await.unwrap();
    assert_eq!(
        s.fetch_user_config("bob").await.unwrap().answered_by,
        Answer::Database
    );
    assert_eq!(db.calls().get, 2);
}

#[tokio::test]
async fn bad_user_ids_are_rejected_before_any_io() {
    let (s, db) = storage().await;
    let long = "x".repeat(257);
    for bad in ["", long.as_str(), "tab\there", "nul\0", "line\nbreak"] {
        let err = s.get_user_config(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidUserId { .. }), "{bad:?}: {err}");
        assert!(err.is_invalid_input());
        assert!(
            s.update_user_config(bad, &UserConfig::default())
                .await
                .is_err()
        );
        assert!(s.invalidate_user_config_cache(bad).await.is_err());
    }
    // 256 bytes is allowed.
    assert!(s.get_user_config(&"y".repeat(256)).await.is_ok());
    assert_eq!(db.calls().write, 0);
    assert_eq!(db.calls().get, 1);
}

#[tokio::test]
async fn oversize_and_invalid_configs_are_rejected_before_any_io() {
    let db = FakeSource::new("db");
    let s = UserConfigStorage::builder()
        .source(Arc::new(db.clone()))
        .max_config_bytes(4096)
        .build()
        .await
        .unwrap();
    let mut big = UserConfig::default_for("u");
    big.image_generation.negative_prompt = "n".repeat(5000);
    let err = s.update_user_config("u", &big).await.unwrap_err();
    assert!(
        matches!(err, Error::ConfigTooLarge { limit: 4096, .. }),
        "{err}"
    );

    let mut out_of_range = UserConfig::default_for("u");
    out_of_range.image_generation.retention_hours = 721;
    let err = s.update_user_config("u", &out_of_range).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

    let someone_else = UserConfig::default_for("mallory");
    let err = s.update_user_config("u", &someone_else).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert_eq!(db.calls().write, 0, "nothing reached the database");
}

#[tokio::test]
async fn a_config_without_user_id_is_stored_under_the_user_updated() {
    let (s, _db) = storage().await;
    s.update_user_config("carol", &UserConfig::default())
        .await
        .unwrap();
    assert_eq!(s.get_user_config("carol").await.unwrap().user_id, "carol");
}

#[tokio::test]
async fn unknown_fields_survive_read_modify_write() {
    let (s, _db) = storage().await;
    let from_newer_service: UserConfig = serde_json::from_value(json!({
        "user_id": "dave",
        "preferences": {"theme": "dark", "accent_colour": "teal"},
        "voice": {"enabled": true}
    }))
    .unwrap();
    s.update_user_config("dave", &from_newer_service)
        .await
        .unwrap();
    s.clear_memory_cache().await;
    // An older service reads, changes one known field, writes back.
    let mut c = (*s.get_user_config("dave").await.unwrap()).clone();
    c.preferences.font_size = 18;
    s.update_user_config("dave", &c).await.unwrap();
    s.clear_memory_cache().await;
    let back = serde_json::to_value(&*s.get_user_config("dave").await.unwrap()).unwrap();
    assert_eq!(back["preferences"]["accent_colour"], "teal");
    assert_eq!(back["voice"]["enabled"], true);
    assert_eq!(back["preferences"]["font_size"], 18);
}

#[tokio::test]
async fn stats_have_the_seed_shape() {
    let (s, _db) = storage().await;
    s.get_user_config("a").await.unwrap();
    s.get_user_config("a").await.unwrap();
    let stats = serde_json::to_value(s.get_cache_stats()).unwrap();
    let memory = &stats["memory_cache"];
    for field in [
        "enabled",
        "entries",
        "max_size",
        "hits",
        "misses",
        "hit_rate",
        "total_requests",
    ] {
        assert!(!memory[field].is_null(), "memory_cache.{field}");
    }
    assert_eq!(memory["max_size"], 500);
    assert_eq!(memory["hits"], 1);
    assert_eq!(memory["misses"], 1);
    assert_eq!(memory["total_requests"], 2);
    assert_eq!(stats["redis_cache"]["enabled"], false);
    assert_eq!(stats["redis_cache"]["connected"], false);
    assert_eq!(stats["database"]["enabled"], true);
    assert_eq!(stats["database"]["backend"], "custom");
}

#[tokio::test]
async fn the_embedded_default_needs_no_server() {
    let dir = std::env::temp_dir().join(tiercache_testkit::env::unique_name("embedded"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("userconfig.sqlite3");
    let s = UserConfigStorage::builder()
        .sqlite_path(&path)
        .build()
        .await
        .unwrap();
    let mut c = UserConfig::default_for("erin");
    c.web_search.enabled = true;
    s.update_user_config("erin", &c).await.unwrap();
    s.clear_memory_cache().await;
    let got = s.fetch_user_config("erin").await.unwrap();
    assert_eq!(got.answered_by, Answer::Database);
    assert!(got.config.web_search.enabled);
    assert_eq!(s.get_cache_stats().database.backend, "sqlite");
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_memory_stops_a_read_in_flight_from_filling_it_again() {
    use tiercache_testkit::{Fault, Gate, Op};
    let (s, db) = storage().await;
    db.put("alice".to_string(), UserConfig::default_for("alice"));
    // A read loads version 1 and is held before its back-fill.
    let gate = Gate::new();
    db.faults().set_for(Op::Get, Fault::Hold(gate.clone()));
    let reader = {
        let s = s.clone();
        tokio::spawn(async move { s.fetch_user_config("alice").await })
    };
    gate.arrived(1).await;
    db.faults().clear();
    // The database is changed behind the cache's back, and the memory cleared for it.
    let mut edited = UserConfig::default_for("alice");
    edited.preferences.theme = "edited".into();
    db.put("alice".to_string(), edited);
    s.clear_memory_cache().await;
    gate.open();
    assert_eq!(reader.await.unwrap().unwrap().version, 1);
    let got = s.fetch_user_config("alice").await.unwrap();
    assert_eq!(
        (got.version, got.answered_by),
        (2, Answer::Database),
        "the read in flight did not put version 1 back"
    );
}

#[tokio::test]
async fn a_failed_database_call_is_counted_once() {
    let postgres = tiercache_postgres::PostgresSource::builder()
        .url("postgres://postgres@127.0.0.1:1/nothing")
        .build()
        .unwrap();
    let s = UserConfigStorage::builder()
        .postgres_source(Arc::new(postgres))
        .max_stale(None)
        .build()
        .await
        .unwrap();
    assert!(s.get_user_config("alice").await.is_err());
    let stats = s.get_cache_stats();
    assert_eq!(stats.database.errors, 1, "{:?}", stats.database);
    assert_eq!(stats.chain.failed, 1);
}
