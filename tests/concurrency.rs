//! Many tasks on a multi-thread runtime reading and updating the same keys through tiers that
//! answer after injected delays: every read honours the reader's own last update, and once the
//! tasks stop every tier holds the source's version.

use std::sync::Arc;
use std::time::Duration;

use tiercache_core::{CacheTier, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Op};

const TASKS: u64 = 16;
const OPS: u64 = 300;
const KEYS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_readers_and_updaters_converge_to_the_source_version() {
    let memory = Arc::new(
        MemoryTier::<u64, String>::builder()
            .capacity(64)
            .build()
            .unwrap(),
    );
    let l2 = FakeTier::<u64, String>::cache("l2");
    let l3 = FakeTier::<u64, String>::cache("l3");
    let db = FakeSource::<u64, String>::new("db");
    // Slow paths at different places, so that loads, back-fills and updates interleave.
    l2.faults()
        .set_for(Op::Get, Fault::Delay(Duration::from_micros(200)));
    l3.faults()
        .set_for(Op::Set, Fault::Delay(Duration::from_micros(300)));
    db.faults()
        .set_for(Op::Get, Fault::Delay(Duration::from_micros(500)));
    let cache = TieredCache::builder()
        .shared_tier(memory.clone(), None)
        .tier_with_timeout(l2.clone(), None)
        .tier_with_timeout(l3.clone(), None)
        .source_with_timeout(db.clone(), None)
        .build()
        .unwrap();

    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let cache: TieredCache<u64, String> = cache.clone();
        let (reads, writes) = (reads.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(t);
            let mut mine = [0u64; KEYS as usize];
            for op in 0..OPS {
                let k = rng.u64(0..KEYS);
                if rng.u8(0..10) < 3 {
                    let v = cache
                        .update(&k, Arc::new(format!("{t}/{op}")))
                        .await
                        .unwrap();
                    mine[k as usize] = v;
                    writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    let got = cache.fetch(&k).await.unwrap();
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    assert!(
                        got.version >= mine[k as usize],
                        "task {t} read version {} of key {k} after writing {}",
                        got.version,
                        mine[k as usize]
                    );
                }
                if rng.u8(0..50) == 0 {
                    cache.invalidate(&k).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    for k in 0..KEYS {
        let source = db.version(&k).unwrap_or(0);
        let got = cache.fetch(&k).await.unwrap();
        assert_eq!(got.version, source, "key {k}");
        let in_memory = memory
            .get_stale(&k, Duration::MAX)
            .await
            .unwrap()
            .map(|e| e.version);
        for (tier, held) in [
            ("memory", in_memory),
            ("l2", l2.version(&k)),
            ("l3", l3.version(&k)),
        ] {
            assert!(
                held.is_none() || held == Some(source),
                "{tier} holds version {held:?} of key {k}; the source has {source}"
            );
        }
    }
    // The statistics add up under concurrency: one outcome per read, one count per update,
    // and every load either ran or joined another.
    let stats = cache.stats();
    let (reads, writes) = (
        reads.load(std::sync::atomic::Ordering::Relaxed),
        writes.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(stats.failed, 0);
    // (The tasks' reads, and one per key above.)
    assert_eq!(stats.requests, reads + KEYS, "one outcome per read");
    assert_eq!(stats.updates, writes);
    assert!(stats.source_loads > 0 && stats.source_loads <= reads);
}
