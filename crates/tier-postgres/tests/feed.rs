//! The change feed on the real server (`DATABASE_URL`), chain by chain: a fleet of chains, each
//! with its own source (and its own follower), a memory tier of its own and one shared tier
//! that counts its calls. One follower is elected to read the log; what it reads reaches every
//! chain once, and the shared tier once for the whole fleet; a transaction held open anywhere
//! costs nothing; a handover loses nothing; a change the shared tier missed is replayed by
//! every chain before it reads the key there.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use tiercache_core::{CacheTier, Origin, TieredCache};
use tiercache_postgres::PostgresSource;
use tiercache_testkit::{FakeTier, Fault, FaultProxy, Op, ProxyMode, env, postgres_env};

type Chain = TieredCache<String, serde_json::Value>;

struct Fleet {
    pool: sqlx::PgPool,
    schema: String,
    shared: FakeTier<String, serde_json::Value>,
    chains: Vec<Chain>,
    /// Each chain's own proxy to the database, when asked for.
    proxies: Vec<FaultProxy>,
}

fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let host = rest.rsplit('@').next().unwrap();
    host.split('/').next().unwrap().to_string()
}

impl Fleet {
    async fn new(n: usize, retention: Option<Duration>, proxied: bool) -> Fleet {
        let pool = postgres_env::postgres_pool().await;
        let schema = postgres_env::fresh_schema(&pool).await;
        let shared = FakeTier::cache("shared");
        let mut chains = Vec::new();
        let mut proxies = Vec::new();
        for _ in 0..n {
            let mut url = env::database_url();
            if proxied {
                let proxy = FaultProxy::start(&host_port(&url)).await;
                url = url.replace(&host_port(&url), &proxy.addr().to_string());
                proxies.push(proxy);
            }
            let mut source = PostgresSource::builder()
                .url(url)
                .schema(schema.clone())
                .elect_every(Duration::from_millis(100));
            if let Some(retention) = retention {
                source = source.change_retention(retention);
            }
            let source = source.build().unwrap();
            source.migrate().await.unwrap();
            chains.push(
                TieredCache::builder()
                    .tier(FakeTier::cache("memory").with_peek())
                    .tier(shared.clone())
                    .source(source)
                    .build()
                    .unwrap(),
            );
        }
        let fleet = Fleet {
            pool,
            schema,
            shared,
            chains,
            proxies,
        };
        fleet.settled().await;
        fleet
    }

    /// Waits until every follower is connected and one of them is elected.
    async fn settled(&self) {
        eventually("one follower elected and all connected", || async {
            let feeds: Vec<_> = self
                .chains
                .iter()
                .map(|c| c.stats().feed.unwrap())
                .collect();
            (feeds.iter().all(|f| f.connected) && feeds.iter().filter(|f| f.elected).count() == 1)
                .then_some(())
        })
        .await;
    }

    fn elected(&self) -> usize {
        self.chains
            .iter()
            .position(|c| c.stats().feed.unwrap().elected)
            .expect("one is elected")
    }

    fn table(&self) -> String {
        format!("\"{}\".\"tiercache_entries\"", self.schema)
    }

    async fn sql(&self, statement: String) {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Every key's stored version.
    async fn versions(&self, keys: &[String]) -> Vec<u64> {
        let mut out = Vec::new();
        for key in keys {
            let v: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT version FROM {} WHERE key = $1",
                self.table()
            )))
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            out.push(v.map_or(0, |v| v as u64));
        }
        out
    }

    /// Waits until `chain` serves every key at the database's version.
    async fn current(&self, chain: &Chain, keys: &[String], what: &str) {
        let want = self.versions(keys).await;
        eventually(what, || async {
            for (key, want) in keys.iter().zip(&want) {
                if chain.fetch(key).await.unwrap().version != *want {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    async fn logged(&self) -> i64 {
        sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".\"tiercache_entries_changes\"",
            self.schema
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    async fn cleanup(self) {
        drop(self.chains);
        postgres_env::drop_schema(&self.pool, &self.schema).await;
    }
}

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}

/// Inserts `n` keys with one statement and waits until every chain has applied the inserts
/// and caches every key.
async fn seeded(fleet: &Fleet, n: usize) -> Vec<String> {
    fleet
        .sql(format!(
            "INSERT INTO {} (key, value) SELECT 'k' || i, jsonb_build_object('n', i) \
             FROM generate_series(0, {}) i",
            fleet.table(),
            n - 1
        ))
        .await;
    let keys = keys(n);
    for (i, chain) in fleet.chains.iter().enumerate() {
        eventually(&format!("chain {i} applied the inserts"), || async {
            (chain.stats().feed_changes >= n as u64).then_some(())
        })
        .await;
        fleet
            .current(chain, &keys, &format!("chain {i} caches every key"))
            .await;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_every_chain_once_and_the_shared_tier_once_for_the_fleet() {
    let fleet = Fleet::new(4, None, false).await;
    let keys = seeded(&fleet, 200).await;
    let before: Vec<u64> = fleet
        .chains
        .iter()
        .map(|c| c.stats().feed_changes)
        .collect();
    let shared_before = fleet.shared.calls().invalidate;
    fleet
        .sql(format!(
            "UPDATE {} SET value = value || '{{\"m\": 1}}'",
            fleet.table()
        ))
        .await;
    for (i, chain) in fleet.chains.iter().enumerate() {
        fleet
            .current(chain, &keys, &format!("chain {i} serves the update"))
            .await;
    }
    // A few more rounds of the elected follower: nothing is read or applied again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, chain) in fleet.chains.iter().enumerate() {
        assert_eq!(
            chain.stats().feed_changes - before[i],
            200,
            "chain {i} applied each change once"
        );
        assert_eq!(chain.stats().feed_flushes, 0);
    }
    assert_eq!(
        fleet.shared.calls().invalidate - shared_before,
        200,
        "one invalidation of the shared tier per change, for the whole fleet"
    );
    // This server cannot stream the WAL (`wal_level` is not `logical`): the migrations and
    // the followers made nothing outside the schema (a publication is database-wide, and
    // would outlive it).
    let channel = PostgresSource::<String, serde_json::Value>::builder()
        .url(env::database_url())
        .schema(fleet.schema.clone())
        .build()
        .unwrap()
        .channel();
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&fleet.pool)
        .await
        .unwrap();
    if wal_level != "logical" {
        let published: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&channel)
                .fetch_one(&fleet.pool)
                .await
                .unwrap();
        assert!(
            !published,
            "publication {channel} made on a server that cannot stream"
        );
    }
    fleet.cleanup().await;
}

/// A transaction held open on another connection (it has a transaction id, so every snapshot
/// lists it as running) while 2,000 rows change: each change is applied once per chain, nothing
/// is flushed, and pruning with a tiny retention while it is still open deletes the log without
/// making anyone flush or read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_held_open_pins_no_cursor_and_no_flush() {
    let fleet = Fleet::new(3, Some(Duration::from_millis(400)), false).await;
    // (With so short a retention, a follower that started more than 400 ms after the first
    // may have flushed once on its first read: before this test's changes.)
    let flushed: Vec<u64> = fleet
        .chains
        .iter()
        .map(|c| c.stats().feed_flushes)
        .collect();
    let mut open = fleet.pool.begin().await.unwrap();
    let _xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let keys = seeded(&fleet, 1000).await;
    for _ in 0..2 {
        fleet
            .sql(format!(
                "UPDATE {} SET value = value || jsonb_build_object('m', random())",
                fleet.table()
            ))
            .await;
    }
    for (i, chain) in fleet.chains.iter().enumerate() {
        fleet
            .current(chain, &keys, &format!("chain {i} is current"))
            .await;
    }
    // Pruned while the transaction is still open: the log empties, no one flushes.
    eventually("the log is pruned", || async {
        (fleet.logged().await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, chain) in fleet.chains.iter().enumerate() {
        let stats = chain.stats();
        assert_eq!(
            stats.feed_changes, 3000,
            "chain {i}: each change applied once"
        );
        assert_eq!(stats.feed_flushes, flushed[i], "chain {i}: nothing flushed");
    }
    open.rollback().await.unwrap();
    fleet.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_elected_follower_hands_over_without_losing_a_change() {
    let fleet = Fleet::new(3, None, true).await;
    let keys = seeded(&fleet, 20).await;
    let first = fleet.elected();
    // The elected follower's database goes away (its session, and its lock, with it), and
    // changes are made while nobody reads the log.
    fleet.proxies[first].set_mode(ProxyMode::Reset);
    fleet.proxies[first].kill_connections();
    for round in 0..3 {
        fleet
            .sql(format!(
                "UPDATE {} SET value = jsonb_build_object('round', {round})",
                fleet.table()
            ))
            .await;
    }
    for (i, chain) in fleet.chains.iter().enumerate().filter(|(i, _)| *i != first) {
        fleet
            .current(chain, &keys, &format!("chain {i} after the handover"))
            .await;
    }
    let second = fleet.elected();
    assert_ne!(second, first, "another follower took over");
    eventually("the cut-off follower says so", || async {
        (!fleet.chains[first].stats().feed.unwrap().connected).then_some(())
    })
    .await;
    // The first one comes back and catches up, without flushing.
    fleet.proxies[first].set_mode(ProxyMode::Pass);
    fleet
        .current(
            &fleet.chains[first],
            &keys,
            "the first one after it came back",
        )
        .await;
    for chain in &fleet.chains {
        assert_eq!(chain.stats().feed_flushes, 0);
    }
    fleet.cleanup().await;
}

/// A follower cut off while the elected one applies a change, that comes back and is
/// elected at once (the other has gone meanwhile), resumes where the last elected follower
/// got to: past the change, which its own local tier never dropped. It catches up with its own
/// cursor first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_elected_as_it_comes_back_first_catches_up_its_own_tiers() {
    let fleet = Fleet::new(2, None, true).await;
    let keys = seeded(&fleet, 5).await;
    let leader = fleet.elected();
    let other = 1 - leader;
    fleet.proxies[other].set_mode(ProxyMode::Reset);
    fleet.proxies[other].kill_connections();
    eventually("the other follower cut off", || async {
        (!fleet.chains[other].stats().feed.unwrap().connected).then_some(())
    })
    .await;
    fleet
        .sql(format!(
            "UPDATE {} SET value = jsonb_build_object('late', 1)",
            fleet.table()
        ))
        .await;
    fleet
        .current(
            &fleet.chains[leader],
            &keys,
            "the elected chain serves the change",
        )
        .await;
    // Its cursor, past the change, is saved (once a second); then it goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fleet.proxies[leader].set_mode(ProxyMode::Reset);
    fleet.proxies[leader].kill_connections();
    eventually("the elected follower gone", || async {
        (!fleet.chains[leader].stats().feed.unwrap().connected).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.proxies[other].set_mode(ProxyMode::Pass);
    eventually("the other follower elected", || async {
        fleet.chains[other]
            .stats()
            .feed
            .unwrap()
            .elected
            .then_some(())
    })
    .await;
    fleet
        .current(
            &fleet.chains[other],
            &keys,
            "the follower that came back serves the change",
        )
        .await;
    fleet.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_shared_tier_missed_is_replayed_by_every_chain_before_it_reads_there() {
    let fleet = Fleet::new(2, None, false).await;
    let keys = seeded(&fleet, 1).await;
    let key = &keys[0];
    // Every instance holds version 1 in memory and the shared tier.
    let old = fleet.chains[0].fetch(key).await.unwrap().version;
    fleet.shared.faults().set_for(Op::Invalidate, Fault::Error);
    fleet
        .sql(format!(
            "UPDATE {} SET value = '{{\"n\": 2}}' WHERE key = '{key}'",
            fleet.table()
        ))
        .await;
    let new = fleet.versions(&keys).await[0];
    assert!(new > old);
    for (i, chain) in fleet.chains.iter().enumerate() {
        eventually(
            &format!("chain {i} knows the shared tier missed it"),
            || async { (chain.stats().tiers[1].pending_repairs > 0).then_some(()) },
        )
        .await;
    }
    // The shared tier still holds the old version, and no chain reads it there.
    assert_eq!(fleet.shared.version(key), Some(old));
    for (i, chain) in fleet.chains.iter().enumerate() {
        let got = chain.fetch(key).await.unwrap();
        assert_eq!(
            (got.version, got.origin),
            (new, Origin::Source),
            "chain {i}"
        );
    }
    fleet.shared.faults().clear();
    for (i, chain) in fleet.chains.iter().enumerate() {
        eventually(&format!("chain {i} replayed it"), || async {
            (chain.stats().tiers[1].pending_repairs == 0).then_some(())
        })
        .await;
    }
    assert_ne!(fleet.shared.version(key), Some(old));
    for chain in &fleet.chains {
        assert_eq!(chain.fetch(key).await.unwrap().version, new);
    }
    let _ = fleet.shared.clear().await;
    fleet.cleanup().await;
}

/// The version counter set back behind every cache's back (a restore of the counter, a
/// logical switchover that does not carry sequences): the caches hold versions the database
/// will hand out again, and would refuse its next changes as older. The elected follower
/// notices, every cache is flushed once (its memory and the shared tier, and every other
/// chain's memory), the counter is set past what the caches held, and every chain serves the
/// database's changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_counter_set_back_flushes_every_cache_once_and_versions_go_on_up() {
    let fleet = Fleet::new(2, None, false).await;
    let keys = seeded(&fleet, 10).await;
    let held = fleet.versions(&keys).await;
    let high = *held.iter().max().unwrap();
    let flushed: Vec<u64> = fleet
        .chains
        .iter()
        .map(|c| c.stats().feed_flushes)
        .collect();
    fleet
        .sql(format!(
            "SELECT setval('\"{}\".\"tiercache_entries_versions\"', 1)",
            fleet.schema
        ))
        .await;
    fleet
        .sql(format!(
            "UPDATE {} SET value = '{{\"n\": -1}}' WHERE key = 'k0'",
            fleet.table()
        ))
        .await;
    for (i, chain) in fleet.chains.iter().enumerate() {
        fleet
            .current(
                chain,
                &keys,
                &format!("chain {i} serves the database's versions"),
            )
            .await;
        assert_eq!(
            chain.stats().feed_flushes,
            flushed[i] + 1,
            "chain {i} flushed once"
        );
    }
    // The next change is numbered past every version the caches held.
    fleet
        .sql(format!(
            "UPDATE {} SET value = '{{\"n\": -2}}' WHERE key = 'k1'",
            fleet.table()
        ))
        .await;
    let after = fleet.versions(&keys[1..2]).await[0];
    assert!(after > high, "{after} after {high}");
    for (i, chain) in fleet.chains.iter().enumerate() {
        fleet
            .current(chain, &keys, &format!("chain {i} serves the next change"))
            .await;
        assert_eq!(chain.stats().feed_flushes, flushed[i] + 1, "chain {i}");
    }
    fleet.cleanup().await;
}
