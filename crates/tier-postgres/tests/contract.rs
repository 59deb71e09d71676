//! The shared source contract ([`tiercache_testkit::contract`]) on the real PostgreSQL
//! (`DATABASE_URL`): every check in a fresh schema of its own, dropped afterwards.

use std::future::Future;
use std::sync::Arc;

use tiercache_postgres::PostgresSource;
use tiercache_testkit::contract::{self, ContractValue};
use tiercache_testkit::{env, postgres_env};

type Tier = PostgresSource<String, ContractValue>;

/// Runs `check` on a tier in a new schema, then drops the schema.
async fn in_fresh_schema<F, Fut>(check: F)
where
    F: FnOnce(Arc<Tier>) -> Fut,
    Fut: Future<Output = ()>,
{
    let pool = postgres_env::postgres_pool().await;
    let schema = postgres_env::fresh_schema(&pool).await;
    let tier = PostgresSource::builder()
        .url(env::database_url())
        .schema(&schema)
        // The contract is about versions, not time: 50 writers queue for one row over ten
        // connections while the other checks migrate their schemas, and on a loaded 2-core
        // machine the default 1 s wait for a connection ran out once (PoolBusy, in CI).
        .acquire_timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    check(Arc::new(tier)).await;
    postgres_env::drop_schema(&pool, &schema).await;
}

/// One test per check: `check_name => |tier| call`.
macro_rules! contract_tests {
    ($($check:ident => |$tier:ident| $call:expr;)*) => {$(
        #[tokio::test]
        async fn $check() {
            in_fresh_schema(|$tier| async move { $call.await }).await;
        }
    )*};
}

contract_tests! {
    missing_key_is_none => |t| contract::missing_key_is_none(&*t);
    writes_increase_versions => |t| contract::writes_increase_versions(&*t);
    get_many_keeps_order => |t| contract::get_many_keeps_order(&*t);
    concurrent_writes_get_distinct_versions =>
        |t| contract::concurrent_writes_get_distinct_versions(t);
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
