//! What a storage says when it is built: at info, which tiers and database it chose (never a
//! URL); a warning, naming the file, when it falls back to the embedded SQLite file.

use tiercache_testkit::{Captured, env};
use userconfig::UserConfigStorage;

#[tokio::test]
async fn a_storage_says_which_tiers_it_chose_and_warns_of_the_embedded_fallback() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let dir = std::env::temp_dir().join(env::unique_name("choices"));
    std::fs::create_dir_all(&dir).unwrap();

    // No database URL: the embedded file, with a warning that names it.
    let file = dir.join("fallback.sqlite3");
    let storage = UserConfigStorage::builder()
        .sqlite_path(&file)
        .memory_capacity(7)
        .build()
        .await
        .unwrap();
    let said = captured.take();
    let warning = said
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning: {said}"));
    assert!(warning.contains("embedded SQLite"), "{warning}");
    assert!(warning.contains(&file.display().to_string()), "{warning}");
    let chose = said
        .lines()
        .find(|l| l.contains("INFO"))
        .unwrap_or_else(|| panic!("no choice logged: {said}"));
    for expected in ["database=\"sqlite\"", "redis=\"none\"", "memory_capacity=7"] {
        assert!(chose.contains(expected), "{expected} in {chose}");
    }
    drop(storage);

    // A database URL chosen on purpose: no warning. A Redis URL with a password: the choice
    // names a Redis server, never the URL.
    let password = "pw-sentinel-31f";
    let _storage = UserConfigStorage::builder()
        .database_url(format!("sqlite:{}", dir.join("chosen.sqlite3").display()))
        .redis_url(format!("redis://someone:{password}@127.0.0.1:1/"))
        .build()
        .await
        .unwrap();
    let said = captured.take();
    assert!(!said.contains("WARN userconfig"), "{said}");
    let chose = said
        .lines()
        .find(|l| l.contains("userconfig storage"))
        .unwrap_or_else(|| panic!("no choice logged: {said}"));
    assert!(chose.contains("redis=\"server\""), "{chose}");
    assert!(!said.contains(password), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
