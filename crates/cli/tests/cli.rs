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
    assert!(
        text(&get.stderr).contains("stored, version 1 (from database)"),
        "{}",
        text(&get.stderr)
    );

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
    // Invalid input: exit code 3, before any I/O (the database URL names no server).
    let nowhere = "postgres://nobody@127.0.0.1:1/none";
    let out = userconfig(&["get", ""], nowhere);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("invalid user id"),
        "{}",
        text(&out.stderr)
    );
    let out = userconfig(&["set", "bob", "{not json"], nowhere);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not valid JSON"));
    // A bad setting: usage, exit code 2, and the URL's secret is never repeated.
    let out = userconfig(&["stats"], "mysql://s3cret-sentinel@db/x");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("s3cret-sentinel"),
        "{}",
        text(&out.stderr)
    );
    let out = userconfig(&["simulate", "--users", "0", "--no-progress"], &db);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // An unknown option: clap's usage error, exit code 2.
    let out = userconfig(&["get", "bob", "--no-such-option"], &db);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // The database unreachable: exit code 5.
    let out = userconfig(&["get", "bob"], nowhere);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
}

#[test]
fn json_on_every_command_and_get_require_stored() {
    let (_dir, db) = temp_db("json");
    let json = |args: &[&str]| {
        let out = userconfig(args, &db);
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} printed no JSON ({e}): {}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        });
        (out.status.code(), value)
    };
    let (code, v) = json(&[
        "set",
        "carol",
        r#"{"preferences":{"theme":"dark"}}"#,
        "--json",
    ]);
    assert_eq!((code, v["version"].as_u64()), (Some(0), Some(1)), "{v}");
    let (code, v) = json(&["get", "carol", "--json", "--require-stored"]);
    assert_eq!(code, Some(0));
    assert_eq!(v["stored"], true);
    assert_eq!(v["version"], 1);
    assert_eq!(v["config"]["preferences"]["theme"], "dark");
    let (code, v) = json(&["set", "carol", "{}", "--if-version", "7", "--json"]);
    assert_eq!(code, Some(6));
    assert_eq!(v["error"]["kind"], "conflict");
    assert_eq!(v["error"]["current_version"], 1);
    let (code, v) = json(&["get", "nobody", "--json", "--require-stored"]);
    assert_eq!(code, Some(4));
    assert_eq!(v["error"]["kind"], "not_found");
    assert_eq!(v["error"]["exit_code"], 4);
    let (_, v) = json(&["get", "nobody", "--json"]);
    assert_eq!(
        (v["stored"].as_bool(), v["version"].as_u64()),
        (Some(false), Some(0))
    );
    let (code, v) = json(&["invalidate", "carol", "--json"]);
    assert_eq!(
        (code, &v["invalidated"]),
        (Some(0), &serde_json::json!(true))
    );
    let (_, v) = json(&["warm", "carol", "nobody", "--json"]);
    assert_eq!(
        (v["users"].as_u64(), v["stored"].as_u64()),
        (Some(2), Some(1))
    );
    let (_, v) = json(&["stats", "--json"]);
    assert_eq!(v["database"]["backend"], "sqlite");
    let (_, v) = json(&["migrate", "--json"]);
    assert_eq!(
        (&v["database"], &v["migrated"]),
        (&serde_json::json!("sqlite"), &serde_json::json!(true))
    );
    let (code, v) = json(&["delete", "carol", "--json"]);
    assert_eq!((code, &v["deleted"]), (Some(0), &serde_json::json!(true)));
    let (code, v) = json(&["get", "", "--json"]);
    assert_eq!(
        (code, &v["error"]["kind"]),
        (Some(3), &serde_json::json!("invalid_input"))
    );
}

#[test]
fn warm_reads_user_ids_from_standard_input() {
    use std::io::Write as _;
    let (_dir, db) = temp_db("warm_stdin");
    assert!(userconfig(&["set", "dave", "{}"], &db).status.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_userconfig"))
        .args(["warm", "--file", "-", "--json"])
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", &db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"dave\nerin\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["users"].as_u64(), v["stored"].as_u64()),
        (Some(2), Some(1))
    );
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

    // A conditional delete against the old version deletes nothing.
    let stale = userconfig(&["delete", "carol", "--if-version", "1"], &db);
    assert_eq!(stale.status.code(), Some(6), "{}", text(&stale.stderr));
    let get = userconfig(&["get", "carol"], &db);
    let config: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(config["preferences"]["theme"], "light", "nothing deleted");

    let deleted = userconfig(&["delete", "carol", "--if-version", "2"], &db);
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

#[test]
fn simulate_removes_its_synthetic_users_unless_told_to_keep_them() {
    let (_dir, db) = temp_db("sim_cleanup");
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_userconfig"))
            .args([
                "simulate",
                "--users",
                "50",
                "--requests",
                "400",
                "--instances",
                "1",
                "--no-progress",
                "--json",
                "-",
            ])
            .args(extra)
            .env_remove("REDIS_URL")
            .env("DATABASE_URL", &db)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        // The JSON alone on stdout: the report went to stderr.
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
    };
    let first_user =
        |result: &serde_json::Value| format!("sim-{}-0", result["run_id"].as_str().unwrap());

    let removed = run(&[]);
    // 90% of 50 were stored first; a write may have created another.
    let count = removed["users_removed"].as_u64().unwrap();
    assert!((45..=50).contains(&count), "{count}");
    let gone = userconfig(&["get", &first_user(&removed), "--require-stored"], &db);
    assert_eq!(gone.status.code(), Some(4), "{}", text(&gone.stderr));

    let kept = run(&["--keep-data", "--seed", "7"]);
    assert!(kept["users_removed"].is_null());
    let there = userconfig(&["get", &first_user(&kept), "--require-stored"], &db);
    assert_eq!(there.status.code(), Some(0), "{}", text(&there.stderr));
}
