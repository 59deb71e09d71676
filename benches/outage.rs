//! A read right after an outage: the second tier missed the invalidations of 10,000 keys
//! while it was down, and they wait for their replay (which keeps failing here, so that they
//! stay pending for the whole measurement). A read of another key must cost what it costs
//! with nothing pending: replays run in a task of their own, and a read only checks whether
//! its own key waits for one. (Before, the first read after the outage replayed every pending
//! key, one round trip at a time, inside its own latency.)
//!
//! Both chains are memory (16 entries, so that reads miss it) over an in-process second tier
//! and source, measured in one run:
//!
//! ```text
//! cargo bench --bench outage
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tiercache_core::{BreakerPolicy, TieredCache};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, Op};

const PENDING: usize = 10_000;
const READ_KEYS: usize = 4_096;

fn chain(pending: usize, rt: &tokio::runtime::Runtime) -> TieredCache<String, String> {
    let redis = FakeTier::<String, String>::cache("redis");
    let source = FakeSource::<String, String>::new("db");
    let chain = TieredCache::builder()
        .tier(MemoryTier::builder().capacity(16).build().unwrap())
        .tier(redis.clone())
        .source(source.clone())
        .breaker(BreakerPolicy::never())
        .max_pending_repairs(2 * PENDING)
        // The failed updates raise version floors too, alive for the floor TTL (the Redis
        // TTL in userconfig): short here, so that this measures the pending replays alone.
        .floor_ttl(Duration::from_millis(1))
        .max_stale(None)
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..READ_KEYS {
            let key = format!("read-{i}");
            source.put(key.clone(), "v".to_string());
            chain.get(&key).await.unwrap();
        }
        // The outage: invalidations fail, and go on failing.
        redis.faults().set_for(Op::Invalidate, Fault::Error);
        for i in 0..pending {
            chain
                .update(&format!("written-{i}"), Arc::new("v".to_string()))
                .await
                .unwrap();
        }
        assert_eq!(chain.stats().tiers[1].pending_repairs as usize, pending);
        tokio::time::sleep(Duration::from_millis(5)).await;
        chain.get(&"read-0".to_string()).await.unwrap();
        assert_eq!(chain.stats().floors, 0, "the floors died");
    });
    chain
}

fn bench_outage(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<String> = (0..READ_KEYS).map(|i| format!("read-{i}")).collect();
    let mut group = c.benchmark_group("read_from_the_second_tier");
    for pending in [0, PENDING] {
        let chain = chain(pending, &rt);
        group.bench_function(BenchmarkId::new("pending_repairs", pending), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(rt.block_on(chain.get(&keys[i])).unwrap());
            })
        });
        assert_eq!(
            chain.stats().tiers[1].pending_repairs as usize,
            pending,
            "still pending after the measurement"
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = bench_outage
}
criterion_main!(benches);
