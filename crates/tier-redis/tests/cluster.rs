//! The Redis tier against a three-master Redis Cluster that this test builds from
//! `redis-server` processes on loopback ports: the whole contract of `contract/`, then the
//! facts only a cluster can show (keys spread over the masters, batch reads and `clear` reach
//! every one of them). Skipped, loudly, only where `redis-server` is not installed.

#![cfg(feature = "cluster")]

mod contract;

use std::sync::Arc;
use std::time::Duration;

use contract::{Config, Setup, config, k};
use tiercache_core::{CacheTier, Entry, Origin, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_redis::{RedisBackplane, RedisTier};
use tiercache_testkit::FakeSource;
use tiercache_testkit::redis_env::{self, LocalCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_holds_on_a_three_master_cluster() {
    let Some(cluster) = LocalCluster::start(3).await else {
        return;
    };
    let setup = Setup::Cluster {
        nodes: cluster.nodes(),
    };
    contract::run_all(&setup).await;

    // Keys land on every master; one get_many reads them all back in order; clear empties
    // every master of this tier's keys.
    let tier: RedisTier<String, Config> = setup
        .builder(&redis_env::unique_prefix("spread"))
        .build()
        .unwrap();
    let keys: Vec<String> = (0..300).map(|i| k(&format!("user-{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        assert!(
            tier.set(key, Entry::new(config(key), i as u64 + 1))
                .await
                .unwrap()
        );
    }
    let mut per_master = Vec::new();
    for &port in cluster.ports() {
        per_master.push(count_ours(&cluster, port, tier.prefix()).await);
    }
    assert_eq!(
        per_master.iter().sum::<usize>(),
        keys.len(),
        "{per_master:?}"
    );
    assert!(per_master.iter().all(|&n| n > 50), "{per_master:?}");
    let got = tier.get_many(&keys).await.unwrap();
    let versions: Vec<u64> = got.iter().map(|e| e.as_ref().unwrap().version).collect();
    assert_eq!(versions, (1..=300).collect::<Vec<u64>>());

    tier.clear().await.unwrap();
    for &port in cluster.ports() {
        assert_eq!(count_ours(&cluster, port, tier.prefix()).await, 0, "{port}");
    }
    assert!(
        tier.get_many(&keys)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );

    a_moving_slot_is_followed_through_ask_and_moved(&cluster, &setup).await;
    backplane_reaches_instances_on_other_nodes(&cluster, &setup).await;
    backplanes_move_to_another_node_when_theirs_dies(cluster, &setup).await;
}

/// A master dies and its replica is elected in its place by the cluster itself (after the node
/// time-out, 1 s here). Meanwhile no node serves the dead master's slots: a read of one of its
/// keys waits for the election (the client retries) or fails as a transient error, never
/// answers a miss or another version. Once the replica is master the same tier follows it
/// without being rebuilt, reads back every entry its old master held (one key or a batch), and
/// the whole contract (the version rules, tombstones, `clear` over every master) holds on the
/// cluster as it now is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_over_the_slots_of_its_dead_master() {
    let Some(mut cluster) = LocalCluster::start_with(3, 1, Duration::from_secs(1)).await else {
        return;
    };
    let setup = Setup::Cluster {
        nodes: cluster.nodes(),
    };
    let tier: RedisTier<String, Config> = setup
        .builder(&redis_env::unique_prefix("replica"))
        .build()
        .unwrap();
    let keys: Vec<String> = (0..60).map(|i| k(&format!("user-{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        assert!(
            tier.set(key, Entry::new(config(key), i as u64 + 10))
                .await
                .unwrap()
        );
    }
    // Which keys live on master 0 (slots 0..5461), the one that will die.
    let mut master = cluster.connect(cluster.ports()[0]).await;
    let mut on_dying = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let slot: usize = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(tier.redis_key(key))
            .query_async(&mut master)
            .await
            .unwrap();
        if slot < 16_384 / 3 {
            on_dying.push(i);
        }
    }
    assert!(
        on_dying.len() > 5 && on_dying.len() < 55,
        "{}",
        on_dying.len()
    );
    // Replication is asynchronous: wait until the replica holds all of them.
    let replica = cluster.replica_ports()[0];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count_ours(&cluster, replica, tier.prefix()).await != on_dying.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    cluster.kill(0);
    // Until the replica is master, nobody serves the dead master's slots. A read of one of its
    // keys ends (the client retries through the election; in a chain, the tier's time limit
    // bounds what a caller waits) with the version written or a transient error, never a miss
    // or another version; then it is served again.
    let key = &keys[on_dying[0]];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let call = tokio::time::timeout(Duration::from_secs(10), tier.get(key))
            .await
            .expect("a call to a dead master's slot does not hang");
        match call {
            Ok(found) => {
                let found = found.expect("the replica holds the entry");
                assert_eq!(found.version, on_dying[0] as u64 + 10);
                break;
            }
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica never took over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every entry, on every master, is served by the same tier: one batch read (which the
    // client's own split of MGET failed on every call after a failover: the tier's `slots.rs`).
    let got = tier.get_many(&keys).await.unwrap();
    for (i, entry) in got.iter().enumerate() {
        let entry = entry.as_ref().unwrap_or_else(|| panic!("user-{i} lost"));
        assert_eq!(entry.version, i as u64 + 10);
        assert_eq!(entry.value.as_deref(), Some(&*config(&keys[i])));
    }
    // The version rules run on the new master as on the old one.
    assert!(!tier.set(key, Entry::new(config("older"), 1)).await.unwrap());
    assert!(
        tier.set(key, Entry::new(config("newer"), 1_000))
            .await
            .unwrap()
    );
    // The contract on the cluster as it now is (seeded by the nodes alive).
    let survivors = [cluster.ports()[1], cluster.ports()[2], replica]
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    contract::run_all(&Setup::Cluster { nodes: survivors }).await;
    tier.clear().await.unwrap();
    assert_eq!(count_ours(&cluster, replica, tier.prefix()).await, 0);
}

/// A slot moves from one master to another while the tier uses it, as `redis-cli --cluster
/// reshard` moves it: while it migrates, a key not yet moved is read where it is, a new key is
/// written on the importing master and a moved key read there (ASK redirections); once the slot
/// is assigned to its new master the tier follows (MOVED). The version rules hold throughout:
/// they run in the tier's scripts, on whichever master answers.
async fn a_moving_slot_is_followed_through_ask_and_moved(cluster: &LocalCluster, setup: &Setup) {
    let tier: RedisTier<String, Config> = setup
        .builder(&redis_env::unique_prefix("slot"))
        .build()
        .unwrap();
    let mut cons = Vec::new();
    for &port in cluster.ports() {
        cons.push(cluster.connect(port).await);
    }
    let slot_of = async |con: &mut redis::aio::MultiplexedConnection, key: &str| -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(con)
            .await
            .unwrap()
    };
    let first = k("moving-0");
    let slot = slot_of(&mut cons[0], &tier.redis_key(&first)).await;
    // A second key in the same slot (1 in 16,384 names lands there).
    let mut second = None;
    for i in 1..200_000 {
        let candidate = k(&format!("moving-{i}"));
        if slot_of(&mut cons[0], &tier.redis_key(&candidate)).await == slot {
            second = Some(candidate);
            break;
        }
    }
    let second = second.expect("a second key in the slot");
    assert!(tier.set(&first, Entry::new(config("a1"), 1)).await.unwrap());
    let mut ids = Vec::new();
    let mut holder = None;
    for (i, con) in cons.iter_mut().enumerate() {
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(con)
            .await
            .unwrap();
        ids.push(id);
        // (A master that does not own the slot answers MOVED.)
        let here: i64 = redis::cmd("EXISTS")
            .arg(tier.redis_key(&first))
            .query_async(con)
            .await
            .unwrap_or(0);
        if here == 1 {
            holder = Some(i);
        }
    }
    let from = holder.expect("one master holds the key");
    let to = (from + 1) % cons.len();
    let setslot = async |con: &mut redis::aio::MultiplexedConnection, how: &str, id: &str| {
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(id)
            .query_async(con)
            .await
            .unwrap();
    };
    setslot(&mut cons[to], "IMPORTING", &ids[from]).await;
    setslot(&mut cons[from], "MIGRATING", &ids[to]).await;

    // Migrating: the key still on the old master is read there; a new key goes to the new one.
    assert_eq!(tier.get(&first).await.unwrap().unwrap().version, 1);
    assert!(
        tier.set(&second, Entry::new(config("b1"), 1))
            .await
            .unwrap()
    );
    assert_eq!(tier.get(&second).await.unwrap().unwrap().version, 1);
    // The first key moves; it is found on the new master, and its version rule holds there.
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(cluster.ports()[to])
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(tier.redis_key(&first))
        .query_async(&mut cons[from])
        .await
        .unwrap();
    assert_eq!(tier.get(&first).await.unwrap().unwrap().version, 1);
    assert!(!tier.set(&first, Entry::new(config("a0"), 0)).await.unwrap());
    let both = tier
        .get_many(&[first.clone(), second.clone()])
        .await
        .unwrap();
    assert_eq!(
        both.iter()
            .map(|e| e.as_ref().map(|e| e.version))
            .collect::<Vec<_>>(),
        [Some(1), Some(1)]
    );

    // Assigned to the new master everywhere: the tier follows the MOVED answers.
    for con in &mut cons {
        setslot(con, "NODE", &ids[to]).await;
    }
    assert_eq!(tier.get(&first).await.unwrap().unwrap().version, 1);
    assert!(tier.set(&first, Entry::new(config("a2"), 2)).await.unwrap());
    tier.invalidate(&first, Some(2)).await.unwrap();
    assert!(
        !tier.set(&first, Entry::new(config("a2"), 2)).await.unwrap(),
        "tombstone"
    );
    assert!(tier.get(&second).await.unwrap().is_some());
    for (i, con) in cons.iter_mut().enumerate() {
        let held: i64 = redis::cmd("EXISTS")
            .arg(tier.redis_key(&first))
            .arg(tier.redis_key(&second))
            .query_async(con)
            .await
            .unwrap_or(0);
        assert_eq!(held, if i == to { 2 } else { 0 }, "master {i}");
    }
}

/// Two instances share the cluster tier; their backplanes subscribe on different nodes (a
/// cluster forwards PUBLISH to every node): an update on one replaces the other's memory copy.
async fn backplane_reaches_instances_on_other_nodes(cluster: &LocalCluster, setup: &Setup) {
    let prefix = redis_env::unique_prefix("cluster_bp");
    let redis: Arc<RedisTier<String, Config>> = Arc::new(setup.builder(&prefix).build().unwrap());
    let db = FakeSource::new("db");
    let nodes = cluster.nodes();
    let mut instances = Vec::new();
    for node in [&nodes[0], &nodes[2]] {
        let backplane = RedisBackplane::new(node, format!("{prefix}invalidations")).unwrap();
        instances.push(instance(&redis, &db, backplane, Duration::from_secs(2)).await);
    }
    let (writer, reader) = (&instances[0].0, &instances[1]);
    writer.update(&k("a"), config("v1")).await.unwrap();
    assert_eq!(reader.0.fetch(&k("a")).await.unwrap().version, 1);
    writer.update(&k("a"), config("v2")).await.unwrap();
    // Both updates were published (the first found no copy to replace).
    wait_until(|| reader.1.stats().received >= 2).await;
    let got = reader.0.fetch(&k("a")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Tier(0)));
    assert_eq!(got.value.unwrap().theme, "v2");
}

/// Two instances whose backplanes both start on node 2, then node 2 dies: the subscriptions
/// move to node 0 (a gap, so memory is flushed), a publish that failed on node 2 is retried on
/// node 0, and updates reach the other instance again.
async fn backplanes_move_to_another_node_when_theirs_dies(
    mut cluster: LocalCluster,
    setup: &Setup,
) {
    let prefix = redis_env::unique_prefix("cluster_failover");
    let redis: Arc<RedisTier<String, Config>> = Arc::new(setup.builder(&prefix).build().unwrap());
    let db = FakeSource::new("db");
    let nodes = cluster.nodes();
    let clients = || {
        [&nodes[2], &nodes[0]]
            .iter()
            .map(|n| redis::Client::open(n.as_str()).unwrap())
            .collect::<Vec<_>>()
    };
    let mut instances = Vec::new();
    for _ in 0..2 {
        let backplane =
            RedisBackplane::with_clients(clients(), format!("{prefix}invalidations")).unwrap();
        instances.push(instance(&redis, &db, backplane, Duration::from_millis(300)).await);
    }
    cluster.kill(2);
    // Both notice (the health check's PING, or the connection closing) and move to node 0.
    for (_, backplane) in &instances {
        wait_until(|| backplane.stats().gaps >= 1 && backplane.is_subscribed()).await;
    }
    let (writer, reader) = (&instances[0], &instances[1]);
    // The reader holds a copy; the writer's update must replace it. (The Redis steps of the
    // update may fail for a key whose slot was on node 2: the chain skips them.)
    writer.0.update(&k("b"), config("v1")).await.unwrap();
    wait_until(|| reader.1.stats().received >= 1).await;
    assert_eq!(reader.0.fetch(&k("b")).await.unwrap().version, 1);
    writer.0.update(&k("b"), config("v2")).await.unwrap();
    wait_until(|| reader.1.stats().received >= 2).await;
    let got = reader.0.fetch(&k("b")).await.unwrap();
    assert_eq!((got.version, got.origin), (2, Origin::Tier(0)));
    // The writer's first publish went to node 2, failed, and was retried on node 0.
    let sent = writer.1.stats();
    assert!(sent.publish_errors >= 1, "{sent:?}");
    assert_eq!(sent.published, 2);
}

/// A service instance: its own memory tier over the shared Redis tier (under `limit`) and
/// source, with `backplane` attached and subscribed.
async fn instance(
    redis: &Arc<RedisTier<String, Config>>,
    db: &FakeSource<String, Config>,
    backplane: RedisBackplane,
    limit: Duration,
) -> (TieredCache<String, Config>, RedisBackplane) {
    let cache = TieredCache::builder()
        .tier(MemoryTier::new())
        .shared_tier(redis.clone(), Some(limit))
        .source(db.clone())
        .backplane(Arc::new(backplane.clone()))
        .build()
        .unwrap();
    backplane.attach(&cache);
    wait_until(|| backplane.is_subscribed()).await;
    (cache, backplane)
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

/// How many keys under `prefix` one master holds.
async fn count_ours(cluster: &LocalCluster, port: u16, prefix: &str) -> usize {
    let mut con = cluster.connect(port).await;
    let found: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut con)
        .await
        .unwrap();
    found.len()
}
