//! The `userconfig` binary, run as a user would, on the embedded default (no servers).

use std::path::PathBuf;
use std::process::{Command, Output};

use tiercache_testkit::env;

fn userconfig(args: &[&str], database: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args(args)
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", database)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_db(tag: &str) -> (TempDir, String) {
    let dir = std::env::temp_dir().join(env::unique_name(tag));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("userconfig.sqlite3").display());
    (TempDir(dir), url)
}

#[test]
fn simulate_reports_every_tier_and_the_reads_saved() {
    let json = std::env::temp_dir().join(format!("{}.json", env::unique_name("simulate")));
    let out = Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args([
            "simulate",
            "--users",
            "300",
            "--requests",
            "4000",
            "--instances",
            "2",
            "--concurrency",
            "2",
            "--memory-capacity",
            "50",
            "--no-progress",
            "--json",
        ])
        .arg(&json)
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for expected in [
        "memory",
        "database",
        "writes",
        "p99",
        "saved",
        "memory_cache",
    ] {
        assert!(stdout.contains(expected), "missing {expected}: {stdout}");
    }
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(result["requests"], 4000);
    assert_eq!(result["database"], "sqlite");
    let reads = result["reads"].as_u64().unwrap();
    let db_reads = result["database_reads"].as_u64().unwrap();
    assert!(db_reads < reads, "the cache saved database reads");
    let shares: f64 = result["answered_by"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "shares add up: {shares}");
    assert_eq!(result["stats"].as_array().unwrap().len(), 2);
}

#[test]
fn set_get_invalidate_and_stats_serve_operators() {
    let (_dir, db) = temp_db("operator");
    let set = Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args([
            "set",
            "alice",
            r#"{"preferences": {"theme": "dark"}, "future": [1]}"#,
        ])
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(text(&set.stderr).contains("stored version 1"));

    let get = userconfig(&["get", "alice"], &db);
    assert!(get.status.success(), "{}", text(&get.stderr));
    let config: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(config["user_id"], "alice");
    assert_eq!(config["preferences"]["theme"], "dark");
    assert_eq!(config["preferences"]["font_size"], 14, "defaults filled in");
    assert_eq!(config["future"][0], 1, "unknown fields kept");
    assert!(text(&get.stderr).contains("version 1 from database"));

    let unknown = userconfig(&["get", "nobody"], &db);
    assert!(unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("not stored"),
        "{}",
        text(&unknown.stderr)
    );

    assert!(userconfig(&["invalidate", "alice"], &db).status.success());
    let warm = userconfig(&["warm", "alice", "nobody", "--batch", "1"], &db);
    assert!(warm.status.success(), "{}", text(&warm.stderr));
    assert!(text(&warm.stderr).contains("warmed 2 users (1 with a stored configuration)"));
    let stats = userconfig(&["stats"], &db);
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["memory_cache"]["max_size"], 500);
    assert_eq!(stats["redis_cache"]["enabled"], false);
    assert_eq!(stats["database"]["backend"], "sqlite");
}

#[test]
fn bad_input_is_a_clear_error_and_a_failing_exit() {
    let (_dir, db) = temp_db("bad_input");
    let out = userconfig(&["get", ""], &db);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid user id"),
        "{}",
        text(&out.stderr)
    );
    let out = userconfig(&["set", "bob", "{not json"], &db);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not valid JSON"));
    let out = userconfig(&["stats"], "mysql://s3cret-sentinel@db/x");
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("s3cret-sentinel"),
        "{}",
        text(&out.stderr)
    );
    let out = userconfig(&["simulate", "--users", "0", "--no-progress"], &db);
    assert!(!out.status.success());
}

#[test]
fn a_change_a_cache_could_not_take_is_reported_with_exit_code_5() {
    let (_dir, db) = temp_db("unreached");
    // Nothing listens on port 1: Redis is down, the database is not.
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_userconfig"))
            .args(args)
            .args(["--flush-timeout-ms", "300"])
            .env("REDIS_URL", "redis://127.0.0.1:1/")
            .env("DATABASE_URL", &db)
            .output()
            .unwrap()
    };
    for args in [
        &["set", "alice", r#"{"preferences": {"theme": "dark"}}"#][..],
        &["invalidate", "alice"][..],
    ] {
        let out = run(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
        assert!(stderr.contains("`redis` could not be reached"), "{stderr}");
        assert!(!stderr.contains("127.0.0.1:1"), "no URL: {stderr}");
    }
    // The database took the change all the same.
    let get = userconfig(&["get", "alice"], &db);
    let config: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(config["preferences"]["theme"], "dark");
}

#[test]
fn set_if_version_is_a_compare_and_set_and_delete_restores_the_defaults() {
    let (_dir, db) = temp_db("cas");
    let set = |json: &str, version: &str| {
        userconfig(&["set", "carol", json, "--if-version", version], &db)
    };
    let first = set(r#"{"preferences": {"theme": "dark"}}"#, "0");
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("stored version 1"));
    // Someone else's write moved it on: a set that expects version 1 of "before" is refused.
    let theirs = set(r#"{"preferences": {"theme": "light"}}"#, "1");
    assert!(theirs.status.success(), "{}", text(&theirs.stderr));
    let stale = set(r#"{"preferences": {"theme": "blue"}}"#, "1");
    let stderr = text(&stale.stderr);
    assert_eq!(stale.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("at version 2, not the expected 1"),
        "{stderr}"
    );
    let get = userconfig(&["get", "carol"], &db);
    let config: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(
        config["preferences"]["theme"], "light",
        "the refused set wrote nothing"
    );

    let deleted = userconfig(&["delete", "carol"], &db);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert!(text(&deleted.stderr).contains("deleted at version 3"));
    let get = userconfig(&["get", "carol"], &db);
    assert!(
        text(&get.stderr).contains("not stored"),
        "{}",
        text(&get.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(config["preferences"]["theme"], "system", "the defaults");
    let again = userconfig(&["delete", "carol"], &db);
    assert!(text(&again.stderr).contains("nothing was stored"));
    let recreated = set(r#"{"preferences": {"theme": "blue"}}"#, "0");
    assert!(
        text(&recreated.stderr).contains("stored version 4"),
        "{}",
        text(&recreated.stderr)
    );
}
