//! Cache metrics in Prometheus's text format: a `metrics` recorder, some traffic on the
//! embedded default (memory over a temporary SQLite file), then what a scrape would return.
//!
//! ```text
//! cargo run --example prometheus
//! ```
//!
//! In a service, install the recorder at start-up (before building the storage), call
//! `storage.export_metrics()` before each scrape, and serve `handle.render()` at `/metrics`.

use metrics_exporter_prometheus::PrometheusBuilder;
use userconfig::{UserConfig, UserConfigStorage};

#[tokio::main]
async fn main() -> Result<(), userconfig::Error> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder is installed");

    let dir = std::env::temp_dir().join(format!("tiercache-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let storage = UserConfigStorage::builder()
        .sqlite_path(dir.join("userconfig.sqlite3"))
        .build()
        .await?;
    for i in 0..50 {
        let user = format!("user-{}", i % 20);
        if i % 10 == 0 {
            let mut config = UserConfig::default_for(&user);
            config.preferences.font_size = 12 + i;
            storage.update_user_config(&user, &config).await?;
        }
        storage.get_user_config(&user).await?;
    }

    storage.export_metrics();
    print!("{}", handle.render());
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
