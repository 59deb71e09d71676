//! The shared source contract ([`tiercache_testkit::contract`]) on SQLite: every check on a
//! new database file of its own (under the system's temp directory, removed afterwards) and
//! on a new `:memory:` database.

use std::path::PathBuf;
use std::sync::Arc;

use tiercache_sqlite::{IN_MEMORY, SqliteSource};
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::env;

type Tier = SqliteSource<String, ContractValue>;

/// A database file no other test uses; the file and its WAL files are removed when dropped.
struct TempDb(PathBuf);

impl TempDb {
    fn new(tag: &str) -> Self {
        TempDb(std::env::temp_dir().join(format!("{}.sqlite3", env::unique_name(tag))))
    }

    async fn tier(&self) -> Arc<Tier> {
        Arc::new(Tier::builder().path(&self.0).build().await.unwrap())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn in_memory() -> Arc<Tier> {
    Arc::new(Tier::builder().path(IN_MEMORY).build().await.unwrap())
}

/// One test per check and storage: `check_name => |tier| call`.
macro_rules! contract_tests {
    ($($check:ident => |$tier:ident| $call:expr;)*) => {
        mod on_a_file {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    let db = TempDb::new(stringify!($check));
                    let $tier = db.tier().await;
                    $call.await;
                    drop($tier);
                }
            )*
        }

        mod in_memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $check() {
                    let $tier = in_memory().await;
                    $call.await;
                }
            )*
        }
    };
}

contract_tests! {
    missing_key_is_none => |t| contract::missing_key_is_none(&*t);
    writes_increase_versions => |t| contract::writes_increase_versions(&*t);
    get_many_keeps_order => |t| contract::get_many_keeps_order(&*t);
    concurrent_writes_get_distinct_versions =>
        |t| contract::concurrent_writes_get_distinct_versions(Arc::clone(&t));
    unchanged_writes_commit_nothing => |t| contract::unchanged_writes_commit_nothing(&*t);
    conditional_changes_check_the_version =>
        |t| contract::conditional_changes_check_the_version(&*t);
    racing_conditional_writes_one_wins =>
        |t| contract::racing_conditional_writes_one_wins(Arc::clone(&t));
    deletes_are_changes => |t| contract::deletes_are_changes(&*t);
    keys_and_values_round_trip => |t| contract::keys_and_values_round_trip(&*t);
    history_keeps_every_change => |t| contract::history_keeps_every_change(&*t);
    stats_count_lookups => |t| contract::stats_count_lookups(&*t);
}

/// `run_all` (what a new source tier would call first) passes too.
#[tokio::test]
async fn run_all_passes_on_one_file_per_check() {
    let dbs = Arc::new(std::sync::Mutex::new(Vec::new()));
    contract::run_all(|| {
        let dbs = Arc::clone(&dbs);
        async move {
            let db = TempDb::new("run_all");
            let tier = db.tier().await;
            dbs.lock().unwrap().push(db);
            tier
        }
    })
    .await;
}
