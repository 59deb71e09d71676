//! A user's past configurations on the real servers (`REDIS_URL`, `DATABASE_URL`): every
//! change by any writer is kept with its author, read back, compared as a JSON Patch, rolled
//! back as a new version (a conflict when a write raced it), and purged for privacy.

use sqlx::AssertSqlSafe;
use userconfig::Error;

mod support;
use support::{Servers, themed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_every_change_by_any_writer_and_rollback_is_a_new_version() {
    let s = Servers::new("history").await;
    let a = s.instance().await;
    let v1 = a
        .update_user_config("hana", &themed("hana", "one"))
        .await
        .unwrap();
    let v2 = a
        .update_user_config("hana", &themed("hana", "two"))
        .await
        .unwrap();
    // A change with plain SQL is history too, with its session's application_name.
    let table = s.table();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "BEGIN; SET LOCAL application_name = 'ops-console'; UPDATE {table} \
         SET value = jsonb_set(value, '{{preferences,theme}}', '\"three\"') WHERE key = 'hana'; \
         COMMIT"
    )))
    .execute(&s.pool)
    .await
    .unwrap();
    let v3 = s.db_version("hana").await;
    let history = a.history("hana", 10).await.unwrap();
    let seen: Vec<(u64, String)> = history
        .iter()
        .map(|r| {
            (
                r.version,
                r.config.as_ref().unwrap().preferences.theme.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(v3, "three".into()), (v2, "two".into()), (v1, "one".into())]
    );
    assert_eq!(history[0].author.as_deref(), Some("ops-console"));
    assert_eq!(history[1].author.as_deref(), Some("tiercache"));
    // A writer may name who it writes for: that name, for that change only.
    let named = a
        .by("billing")
        .update_user_config("hana", &themed("hana", "three"))
        .await
        .unwrap();
    assert_eq!(
        named, v3,
        "the same configuration: nothing written, nothing recorded"
    );
    let other = a
        .by("billing")
        .update_user_config("ida", &themed("ida", "x"))
        .await
        .unwrap();
    a.update_user_config("ida", &themed("ida", "y"))
        .await
        .unwrap();
    let ida = a.history("ida", 10).await.unwrap();
    assert_eq!(ida[1].version, other);
    assert_eq!(
        (ida[1].author.as_deref(), ida[0].author.as_deref()),
        (Some("billing"), Some("tiercache")),
        "the name held for its own change only"
    );
    a.by("gdpr-bot").delete_user_config("ida").await.unwrap();
    assert_eq!(
        a.history("ida", 1).await.unwrap()[0].author.as_deref(),
        Some("gdpr-bot")
    );
    assert_eq!(
        a.history_before("hana", Some(v2), 10).await.unwrap().len(),
        1
    );

    // A version read back; the difference between two as a JSON Patch.
    let at = a.get_user_config_at("hana", v1).await.unwrap().unwrap();
    assert_eq!(at.config.unwrap().preferences.theme, "one");
    assert!(
        a.get_user_config_at("hana", v3 + 100)
            .await
            .unwrap()
            .is_none()
    );
    let patch = a.diff_user_config("hana", v1, v3).await.unwrap();
    assert_eq!(
        patch,
        serde_json::json!([{"op": "replace", "path": "/preferences/theme", "value": "three"}])
    );

    // Rollback: a new version holding the old configuration; the past stays as it was.
    let v4 = a.rollback_user_config("hana", v1, None).await.unwrap();
    assert!(v4 > v3);
    assert_eq!(
        a.get_user_config("hana").await.unwrap().preferences.theme,
        "one"
    );
    assert_eq!(a.history("hana", 10).await.unwrap().len(), 4);
    // A rollback pinned to a version a write has since replaced is a conflict, and writes
    // nothing.
    let v5 = a
        .update_user_config("hana", &themed("hana", "five"))
        .await
        .unwrap();
    let raced = a
        .rollback_user_config("hana", v2, Some(v4))
        .await
        .unwrap_err();
    assert_eq!(raced.conflict(), Some(v5), "{raced}");
    assert_eq!(s.db_version("hana").await, v5);
    assert!(matches!(
        a.rollback_user_config("hana", 1_000_000, None).await,
        Err(Error::VersionNotKept { version: 1_000_000 })
    ));

    // Deletion for privacy: the configuration and every past version of it.
    a.update_user_config("other", &themed("other", "x"))
        .await
        .unwrap();
    let gone = a.purge_user_config("hana").await.unwrap();
    assert!(gone > v5);
    assert!(a.history("hana", 10).await.unwrap().is_empty());
    assert!(!a.fetch_user_config("hana").await.unwrap().stored);
    let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".\"tiercache_entries_history\" WHERE key = 'hana'",
        s.schema
    )))
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "nothing of the user is left in the history");
    assert_eq!(a.history("other", 10).await.unwrap().len(), 1);
    s.cleanup().await;
}
