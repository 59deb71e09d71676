//! Model-based property test: random sequences of get / update / invalidate / out-of-band
//! write / clock advance / tier fault, over random orders of the cache tiers, checked against
//! a plain map.
//!
//! Invariants:
//! 1. No read returns a version older than the last update that completed through the chain
//!    (stale copies included), nor newer than the source's.
//! 2. No expired entry is served fresh: once every tier's TTL has passed since a write made
//!    behind the chain's back, fresh reads return that write or a newer one.
//! 3. A read fails only while the source fails; an update fails only while the source fails,
//!    and then changes nothing.
//! 4. The stats add up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tiercache_core::{BreakerPolicy, CacheTier, ManualClock, Origin, TieredCache, Timestamp};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeTier, Fault, FaultSwitch, Faulty};

const KEYS: u8 = 4;
/// The longest cache TTL in the chain: after this, nothing cached before is fresh.
const MAX_TTL: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone)]
enum Step {
    Get(u8),
    Update(u8),
    Invalidate(u8),
    /// A write to the source behind the chain's back.
    OutOfBand(u8),
    Advance(u64),
    TierFault(usize, bool),
    SourceFault(bool),
    Clear,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..KEYS).prop_map(Step::Get),
        3 => (0..KEYS).prop_map(Step::Update),
        1 => (0..KEYS).prop_map(Step::Invalidate),
        1 => (0..KEYS).prop_map(Step::OutOfBand),
        2 => (0u64..2400).prop_map(Step::Advance),
        1 => (0usize..3, any::<bool>()).prop_map(|(t, on)| Step::TierFault(t, on)),
        1 => any::<bool>().prop_map(Step::SourceFault),
        1 => Just(Step::Clear),
    ]
}

struct World {
    manual: ManualClock,
    cache: TieredCache<u8, String>,
    db: FakeTier<u8, String>,
    /// Fault switches of the cache tiers, in the order they were built (not chain order).
    switches: Vec<FaultSwitch>,
}

/// Memory (capacity 3, so evictions happen), and two fake tiers with 10- and 30-minute TTLs,
/// stacked in the order `order` gives.
fn world(order: &[usize]) -> World {
    let manual = ManualClock::new();
    let memory = Faulty::new(
        MemoryTier::<u8, String>::builder()
            .capacity(3)
            .shards(1)
            .ttl(Duration::from_secs(300))
            .clock(manual.clock())
            .build()
            .unwrap(),
    );
    let l2 = FakeTier::cache("l2")
        .with_ttl(Duration::from_secs(600))
        .with_clock(manual.clock());
    let l3 = FakeTier::cache("l3")
        .with_ttl(MAX_TTL)
        .with_clock(manual.clock());
    let switches = vec![
        memory.faults().clone(),
        l2.faults().clone(),
        l3.faults().clone(),
    ];
    let mut tiers: Vec<Option<Arc<dyn CacheTier<u8, String>>>> = vec![
        Some(Arc::new(memory)),
        Some(Arc::new(l2)),
        Some(Arc::new(l3)),
    ];
    let db = FakeTier::source("db").with_clock(manual.clock());
    let mut builder = TieredCache::builder()
        .clock(manual.clock())
        // Breakers run on real time and are tested in resilience.rs; here every call is made.
        .breaker(BreakerPolicy::never())
        .max_stale(Some(Duration::from_secs(300)))
        .negative_ttl(Some(Duration::from_secs(60)))
        .floor_ttl(MAX_TTL);
    for &i in order {
        builder = builder.shared_tier(tiers[i].take().unwrap(), None);
    }
    let cache = builder
        .source_with_timeout(db.clone(), None)
        .build()
        .unwrap();
    World {
        manual,
        cache,
        db,
        switches,
    }
}

#[derive(Default)]
struct Model {
    /// The version of the last update that completed through the chain, per key.
    updated: HashMap<u8, u64>,
    /// The last write behind the chain's back: its version and time.
    out_of_band: HashMap<u8, (u64, Timestamp)>,
    source_down: bool,
    reads: u64,
}

async fn run(order: Vec<usize>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let w = world(&order);
    let mut m = Model::default();
    for step in steps {
        match step {
            Step::Get(k) => {
                m.reads += 1;
                let result = w.cache.fetch(&k).await;
                let source_version = w.db.version(&k).unwrap_or(0);
                match result {
                    Ok(got) => {
                        let floor = m.updated.get(&k).copied().unwrap_or(0);
                        prop_assert!(
                            got.version >= floor,
                            "key {k}: read version {} ({:?}) older than update {floor}",
                            got.version,
                            got.origin
                        );
                        prop_assert!(got.version <= source_version);
                        if !matches!(got.origin, Origin::Stale(_)) {
                            if let Some(&(v, at)) = m.out_of_band.get(&k) {
                                if w.manual.now().saturating_since(at) >= MAX_TTL {
                                    prop_assert!(
                                        got.version >= v,
                                        "key {k}: fresh read {} ({:?}) older than write {v} made {:?} ago",
                                        got.version,
                                        got.origin,
                                        w.manual.now().saturating_since(at)
                                    );
                                }
                            }
                        }
                        prop_assert_eq!(got.is_found(), got.version > 0);
                    }
                    Err(e) => {
                        prop_assert!(m.source_down, "a read failed with the source up: {e:?}");
                        prop_assert!(e.is_transient());
                    }
                }
            }
            Step::Update(k) => {
                let before = w.db.version(&k);
                match w.cache.update(&k, Arc::new(format!("update of {k}"))).await {
                    Ok(v) => {
                        prop_assert!(!m.source_down);
                        m.updated.insert(k, v);
                    }
                    Err(_) => {
                        prop_assert!(m.source_down);
                        prop_assert_eq!(w.db.version(&k), before);
                    }
                }
            }
            Step::Invalidate(k) => {
                // May fail on a faulty tier; it is tried on every tier regardless.
                let _ = w.cache.invalidate(&k).await;
            }
            Step::OutOfBand(k) => {
                let v = w.db.put(k, format!("edited {k}"));
                m.out_of_band.insert(k, (v, w.manual.now()));
            }
            Step::Advance(secs) => w.manual.advance(Duration::from_secs(secs)),
            Step::TierFault(t, on) => {
                if on {
                    w.switches[t].set(Fault::Error);
                } else {
                    w.switches[t].clear();
                }
            }
            Step::SourceFault(on) => {
                m.source_down = on;
                if on {
                    w.db.faults().set(Fault::Error);
                } else {
                    w.db.faults().clear();
                }
            }
            Step::Clear => {
                let _ = w.cache.clear().await;
            }
        }
    }
    let s = w.cache.stats();
    prop_assert_eq!(s.requests, m.reads);
    let answered: u64 = s.tiers.iter().map(|t| t.hits).sum::<u64>()
        + s.source.hits
        + s.not_found
        + s.stale_served
        + s.failed;
    prop_assert_eq!(answered, s.requests);
    prop_assert!(s.source_loads <= s.requests);
    for t in &s.tiers {
        prop_assert_eq!(t.tier.total_requests, t.tier.hits + t.tier.misses);
    }
    Ok(())
}

fn orders() -> impl Strategy<Value = Vec<usize>> {
    Just(vec![0usize, 1, 2]).prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_chain_matches_the_model(
        order in orders(),
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(order, steps))?;
    }
}
