//! The model test: two instances of the chain share a Redis-like tier and a source, and random
//! operations run on them *concurrently* (each step is a task; the next starts after a random
//! gap, on tokio's paused clock, while every tier call waits a random time), some with callers
//! that give up part way, while faults come and go, the database is edited behind the caches'
//! back, and long waits let TTLs pass. Every answer and its start and end are written down;
//! the rules are checked over that history, at the moment they promise to hold:
//!
//! * instance A: memory (1 entry for 4 keys, so entries and tombstones are evicted; its
//!   synchronous hit path on, unless the case makes it jitter), then the shared tier, then the
//!   source; instance B: the shared tier and the source, so that what B reads is what the
//!   shared tier holds;
//! * one clock for everything: the chain's and the tiers' clocks read tokio's (paused) time,
//!   so that a tier call's time limit bounds how late a fill can land, as in production.
//!
//! The rules (each names the code it checks; see the mutations in `docs/testing.md`):
//! 1. **Values**: every answer is a value the source held at that version (0: not found); a
//!    write that failed with a known outcome is never read.
//! 2. **Updates** (versions, marks, floors): a read that starts after an update returned
//!    version `v` on the same instance returns `v` or newer; so does a read on B after an
//!    update on A during which the shared tier's invalidations did not fail (the shared
//!    tier's version rule and tombstones, since B knows nothing of A).
//! 3. **Invalidation** (manual invalidation, bottom-first order, marks, tombstones): after a
//!    change behind the chain's back and an invalidation on X that started after it, a read
//!    on X that starts after the invalidation returned sees the change, at once if the other
//!    instance had nothing in flight (its fills would be removed by the second pass), and
//!    after the second pass (the longest cache-tier limit) otherwise; so does a read on B
//!    after an invalidation on A that returned `Ok`, after the second pass.
//! 4. **Clear**: after `clear` returned `Ok` on X, with the other instance quiet, a read on X
//!    returns at least what the source held when the clear began.
//! 5. **TTLs**: a fresh read starting the longest TTL after a write (plus the longest time a
//!    fill can take) returns it or newer.
//! 6. **Errors**: a read, update or warm fails only if the source was faulty meanwhile; an
//!    invalidation or clear only if one of its instance's cache tiers was.
//! 7. **Quiescence**: at the end, faults cleared, every key invalidated on A and both instances
//!    flushed, every tier holds the source's version of each key or nothing, and both read it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use tiercache_core::{
    BreakerPolicy, CacheTier, Clock, Entry, Error, Origin, Result, TierStats, TieredCache,
    TimeSource, Timestamp, Version,
};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeTier, Fault, FaultSwitch, Faulty, Op};
use tokio::time::Instant;

const KEYS: u8 = 4;
/// The longest cache TTL (the shared tier's): after this, nothing cached before is fresh.
const MAX_TTL: Duration = Duration::from_secs(600);
/// The time limit of a shared-tier call: no fill lands later than this after it was sent.
const TIER_LIMIT: Duration = Duration::from_millis(10);
/// Longer than any fill can take (a source read, then a set within its limit).
/// Memory's time limit in A: longer than its calls take, so that A's second passes come well
/// after its own fills have been taken back.
const MEMORY_LIMIT: Duration = Duration::from_millis(30);
/// How long after a change an instance's own fills that were on their way have landed and
/// been taken back: a set and an invalidation, each within the instance's jitter (A: 5 ms per
/// call, B: 8 ms).
const OWN_SETTLE: [Duration; 2] = [Duration::from_millis(11), Duration::from_millis(20)];
/// Longer than any fill can take (a source read, then a set within its limit).
const FILL_SLACK: Duration = Duration::from_millis(40);
/// Longer than a load can take: memory, the shared tier, the source, and stale copies after a
/// source failure, each within its limit.
const LOAD_SPAN: Duration = Duration::from_millis(80);

/// The chain's and the tiers' clock: tokio's (paused) time.
struct TokioTime(Instant);

impl TimeSource for TokioTime {
    fn now(&self) -> Timestamp {
        Timestamp::from_duration(Duration::from_secs(3600) + self.0.elapsed())
    }
}

/// Every event gets the next number: the history's order.
#[derive(Default)]
struct Seq(AtomicU64);

impl Seq {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A change of a fault switch: when, and which of [`ALL_OPS`] were faulty after it.
type Change = (Instant, [bool; 5]);

/// A fault switch that remembers when each change was made, to tell whether a call ran while
/// a fault was on.
#[derive(Clone, Default)]
struct Tracked {
    switch: FaultSwitch,
    changes: Arc<Mutex<Vec<Change>>>,
}

impl Tracked {
    fn set(&self, op: Option<Op>, fault: Option<Fault>) {
        match (op, fault) {
            (_, None) => self.switch.clear(),
            (None, Some(f)) => self.switch.set(f),
            (Some(op), Some(f)) => self.switch.set_for(op, f),
        }
        let on = ALL_OPS.map(|op| self.switch.is_active(op));
        self.changes.lock().unwrap().push((Instant::now(), on));
    }

    /// Whether one of `ops` was faulty at some time between `from` and `to`.
    fn faulty(&self, ops: &[Op], from: Instant, to: Instant) -> bool {
        let changes = self.changes.lock().unwrap();
        let hits = |on: &[bool; 5]| {
            ops.iter()
                .any(|op| on[ALL_OPS.iter().position(|o| o == op).unwrap()])
        };
        changes.iter().enumerate().any(|(i, (at, on))| {
            let until = changes.get(i + 1).map(|(next, _)| *next);
            hits(on) && *at <= to && until.is_none_or(|u| u >= from)
        })
    }
}

/// A committed write: the source's history.
#[derive(Clone)]
struct Commit {
    key: u8,
    version: Version,
    value: String,
    seq: u64,
    at: Instant,
}

/// The source: a fake database that writes down every commit, with its faults and jitter.
#[derive(Clone)]
struct Db {
    data: FakeTier<u8, String>,
    faults: Tracked,
    jitter: FaultSwitch,
    commits: Arc<Mutex<Vec<Commit>>>,
    seq: Arc<Seq>,
}

impl Db {
    fn commit(&self, key: u8, version: Version, value: String) {
        self.commits.lock().unwrap().push(Commit {
            key,
            version,
            value,
            seq: self.seq.next(),
            at: Instant::now(),
        });
    }
    /// A write behind every cache's back.
    fn edit(&self, key: u8, value: String) -> Commit {
        let version = self.data.put(key, value.clone());
        self.commit(key, version, value);
        self.commits.lock().unwrap().last().unwrap().clone()
    }
    fn version(&self, key: u8) -> Version {
        self.data.version(&key).unwrap_or(0)
    }
    /// The version `value` of `key` was committed at, if it was.
    fn version_of(&self, key: u8, value: &str) -> Option<Version> {
        let commits = self.commits.lock().unwrap();
        commits
            .iter()
            .find(|c| c.key == key && c.value == value)
            .map(|c| c.version)
    }
    async fn faulty<T>(&self, op: Op, call: impl Future<Output = Result<T>>) -> Result<T> {
        let jittered = self.jitter.run("db", op, async { Ok(()) }).await;
        jittered?;
        self.faults.switch.run("db", op, call).await
    }
}

#[async_trait]
impl CacheTier<u8, String> for Db {
    fn name(&self) -> &str {
        "db"
    }
    async fn get(&self, key: &u8) -> Result<Option<Entry<String>>> {
        self.faulty(Op::Get, self.data.get(key)).await
    }
    async fn get_many(&self, keys: &[u8]) -> Result<Vec<Option<Entry<String>>>> {
        self.faulty(Op::Get, self.data.get_many(keys)).await
    }
    async fn set(&self, _: &u8, _: Entry<String>) -> Result<bool> {
        Err(Error::unsupported("db", "set"))
    }
    async fn invalidate(&self, _: &u8, _: Option<Version>) -> Result<()> {
        Err(Error::unsupported("db", "invalidate"))
    }
    async fn clear(&self) -> Result<()> {
        Err(Error::unsupported("db", "clear"))
    }
    async fn write(&self, key: &u8, value: Arc<String>) -> Result<Version> {
        let this = self.clone();
        let key = *key;
        self.faulty(Op::Write, async move {
            let version = this.data.write(&key, Arc::clone(&value)).await?;
            this.commit(key, version, value.to_string());
            Ok(version)
        })
        .await
    }
    fn stats(&self) -> TierStats {
        self.data.stats()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Get(usize, u8),
    GetMany(usize, u8),
    Warm(usize, u8),
    Update(usize, u8),
    Invalidate(usize, u8),
    Clear(usize),
    /// A write behind the caches' back.
    Edit(u8),
    /// A look at what the shared tier holds for the key (no chain involved).
    Probe(u8),
    /// A fault on memory (0), the shared tier (1) or the source (2): on one operation or all,
    /// an error or a hang; `None` clears the target's faults.
    Fault(usize, Option<Op>, Option<bool>),
    /// Lets this many milliseconds pass (TTLs run out; loads and fills land).
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let inst = 0usize..2;
    let key = 0..KEYS;
    let op = prop_oneof![
        2 => Just(None),
        1 => Just(Some(Op::Get)),
        1 => Just(Some(Op::Set)),
        1 => Just(Some(Op::Invalidate)),
        1 => Just(Some(Op::Write)),
    ];
    let fault = prop_oneof![2 => Just(None), 2 => Just(Some(false)), 1 => Just(Some(true))];
    prop_oneof![
        8 => (inst.clone(), key.clone()).prop_map(|(i, k)| Step::Get(i, k)),
        1 => (inst.clone(), key.clone()).prop_map(|(i, k)| Step::GetMany(i, k)),
        1 => (inst.clone(), key.clone()).prop_map(|(i, k)| Step::Warm(i, k)),
        4 => (inst.clone(), key.clone()).prop_map(|(i, k)| Step::Update(i, k)),
        2 => (inst.clone(), key.clone()).prop_map(|(i, k)| Step::Invalidate(i, k)),
        1 => inst.prop_map(Step::Clear),
        2 => key.prop_map(Step::Edit),
        2 => (0usize..3, op, fault).prop_map(|(t, o, f)| Step::Fault(t, o, f)),
        1 => prop_oneof![Just(1_000u64), Just(310_000), Just(610_000)].prop_map(Step::Wait),
    ]
}

/// A step, the gap before the next one starts (µs) and how long its caller waits for it
/// (µs; `None`: until it is done).
type Planned = (Step, u64, Option<u64>);

fn planned() -> impl Strategy<Value = Planned> {
    (
        step(),
        prop_oneof![2 => 0u64..500, 2 => 0u64..5_000, 1 => 5_000u64..30_000],
        prop_oneof![4 => Just(None), 1 => (0u64..8_000).prop_map(Some)],
    )
}

/// The races the rules exist for, each as a burst of steps on one key after a quiet spell
/// (so that the rules that need the other instance quiet apply), with random gaps:
///
/// * a slow read on one instance while the other writes (sometimes with the shared tier
///   refusing sets, so that only the write's tombstone stands in the way), then reads on both;
/// * the caches filled (or emptied) first, a slow read, an edit behind the caches' back, an
///   invalidation with a read started just after it, then reads and looks at the shared tier
///   before and after its second pass;
/// * on A, a slow read, a write, reads of another key (memory holds one entry: the key and its
///   tombstone are evicted), then a read of the key.
fn episode() -> impl Strategy<Value = Vec<Planned>> {
    let short = || 0u64..3_000;
    fn quiet() -> Planned {
        (Step::Wait(50), 0, None)
    }
    let write_race = (
        0usize..2,
        0..KEYS,
        short(),
        short(),
        any::<bool>(),
        2_000u64..25_000,
    )
        .prop_map(move |(r, k, d1, d2, refuse_sets, d3)| {
            let mut e = vec![quiet()];
            if refuse_sets {
                e.push((Step::Fault(1, Some(Op::Set), Some(false)), 0, None));
            }
            e.push((Step::Get(r, k), d1, None));
            e.push((Step::Update(1 - r, k), d2, None));
            if refuse_sets {
                e.push((Step::Fault(1, None, None), 0, None));
            }
            e.extend([
                (Step::Get(0, k), d3, None),
                (Step::Get(1, k), 0, None),
                (Step::Probe(k), 8_000, None),
                (Step::Get(r, k), 0, None),
                (Step::Probe(k), 12_000, None),
            ]);
            e
        });
    let invalidation_race = (
        prop_oneof![3 => Just(true), 1 => Just(false)],
        0usize..2,
        0..KEYS,
        any::<bool>(),
        (short(), short(), 0u64..4_000, 0u64..4_000),
        (5_000u64..35_000, 0u64..10_000),
    )
        .prop_map(
            move |(same, i, k, fill_first, (d1, d2, d3, d4), (d5, d6))| {
                // The slow read mostly on the invalidating instance, whose marks must refuse it.
                let r = if same { i } else { 1 - i };
                // With the caches filled first, the slow read hits (the old copy is there to be
                // copied up); without, it loads from the source and fills on its way back.
                let fill = if fill_first {
                    (Step::Get(i, k), 5_000, None)
                } else {
                    (Step::Invalidate(i, k), 5_000, None)
                };
                vec![
                    quiet(),
                    fill,
                    (Step::Get(r, k), d1, None),
                    (Step::Edit(k), d2, None),
                    (Step::Invalidate(i, k), d3, None),
                    (Step::Get(i, k), 24_000 - d3, None),
                    // 24 ms after the invalidation began: after its own fills were taken back
                    // and before its second pass (A's, 30 ms after it returned).
                    (Step::Probe(k), 0, None),
                    (Step::Get(i, k), d4, None),
                    (Step::Get(i, k), d5, None),
                    (Step::Probe(k), 0, None),
                    (Step::Get(i, k), d6, None),
                    (Step::Get(1, k), 0, None),
                ]
            },
        );
    let eviction_race =
        (0..KEYS, short(), short(), short(), 0u64..6_000).prop_map(move |(k, d1, d2, d3, d4)| {
            let other = (k + 1) % KEYS;
            vec![
                quiet(),
                // The other key in the shared tier, so that reading it evicts at once.
                (Step::Get(0, other), 10_000, None),
                (Step::Get(0, k), d1, None),
                (Step::Update(0, k), d2, None),
                (Step::Get(0, other), d3, None),
                (Step::Get(0, other), d4, None),
                (Step::Get(0, k), 8_000, None),
            ]
        });
    // A slow read on B, a write on A, and an invalidation on A right after it: B's fill of the
    // version before the write must find the invalidation's tombstone.
    let write_then_invalidation =
        (0..KEYS, short(), 2_000u64..8_000, 5_000u64..20_000).prop_map(move |(k, d1, d2, d3)| {
            vec![
                quiet(),
                (Step::Get(1, k), d1, None),
                (Step::Update(0, k), d2, None),
                (Step::Invalidate(0, k), d3, None),
                (Step::Probe(k), 10_000, None),
                (Step::Get(1, k), 0, None),
                (Step::Probe(k), 0, None),
            ]
        });
    prop_oneof![
        write_race,
        invalidation_race,
        eviction_race,
        write_then_invalidation
    ]
}

/// Random steps and races, one after the other.
fn plan() -> impl Strategy<Value = Vec<Planned>> {
    proptest::collection::vec(
        prop_oneof![
            3 => planned().prop_map(|p| vec![p]),
            2 => episode(),
            1 => (0..KEYS).prop_map(|k| vec![(Step::Probe(k), 0, None)]),
        ],
        1..40,
    )
    .prop_map(|parts| parts.into_iter().flatten().collect())
}

#[derive(Debug, Clone, Copy)]
struct Case {
    /// Fills of the lower tiers run in the background.
    background: bool,
    /// Memory calls wait a random time too (its synchronous path is then off).
    memory_jitter: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop_oneof![3 => Just(false), 1 => Just(true)],
        any::<u64>(),
    )
        .prop_map(|(background, memory_jitter, seed)| Case {
            background,
            memory_jitter,
            seed,
        })
}

struct World {
    a: TieredCache<u8, String>,
    b: TieredCache<u8, String>,
    memory: Arc<MemoryTier<u8, String>>,
    shared: FakeTier<u8, String>,
    db: Db,
    /// Faults of memory, the shared tier and the source.
    faults: [Tracked; 3],
    seq: Arc<Seq>,
    /// Each instance's second-pass delay (its longest cache-tier limit).
    grace: [Duration; 2],
}

fn world(case: Case) -> World {
    let clock = Clock::custom(Arc::new(TokioTime(Instant::now())));
    let seq = Arc::new(Seq::default());
    let jitter = |n: u64, max_ms: u64| {
        let s = FaultSwitch::with_seed(case.seed.wrapping_mul(31).wrapping_add(n));
        s.set(Fault::Jitter(Duration::from_millis(max_ms)));
        s
    };
    let faults: [Tracked; 3] = Default::default();
    let memory = Arc::new(
        MemoryTier::builder()
            .capacity(1)
            .shards(1)
            .ttl(Duration::from_secs(300))
            .clock(clock.clone())
            .build()
            .unwrap(),
    );
    let mut memory_tier: Arc<dyn CacheTier<u8, String>> = Arc::new(Faulty::with_switch(
        memory.clone(),
        faults[0].switch.clone(),
    ));
    if case.memory_jitter {
        memory_tier = Arc::new(Faulty::with_switch(memory_tier, jitter(1, 3)));
    }
    let shared = FakeTier::cache("shared")
        .with_ttl(MAX_TTL)
        .with_clock(clock.clone())
        .with_faults(faults[1].switch.clone());
    let db = Db {
        data: FakeTier::source("db").with_clock(clock.clone()),
        faults: faults[2].clone(),
        jitter: jitter(2, 4),
        commits: Arc::default(),
        seq: seq.clone(),
    };
    let chain = |tiers: Vec<(Arc<dyn CacheTier<u8, String>>, Duration)>| {
        let mut builder = TieredCache::builder()
            .clock(clock.clone())
            // Breakers are the race harness's (race.rs); here every call is made, so that an
            // error can be traced to a fault.
            .breaker(BreakerPolicy::never())
            .max_stale(Some(Duration::from_secs(300)))
            .negative_ttl(Some(Duration::from_secs(60)))
            .background_backfill(case.background)
            .write_settle(Duration::from_millis(50))
            .max_pending_repairs(2);
        for (tier, limit) in tiers {
            builder = builder.shared_tier(tier, Some(limit));
        }
        builder
            .shared_source(Arc::new(db.clone()), Some(Duration::from_millis(15)))
            .build()
            .unwrap()
    };
    // Each instance sees the shared tier through jitter of its own: B's fills are the slow ones.
    let shared_for = |n: u64, max_ms: u64| -> Arc<dyn CacheTier<u8, String>> {
        Arc::new(Faulty::with_switch(shared.clone(), jitter(n, max_ms)))
    };
    let a = chain(vec![
        (memory_tier, MEMORY_LIMIT),
        (shared_for(3, 5), TIER_LIMIT),
    ]);
    let b = chain(vec![(shared_for(4, 8), TIER_LIMIT)]);
    World {
        a,
        b,
        memory,
        shared,
        db,
        faults,
        seq,
        grace: [MEMORY_LIMIT, TIER_LIMIT],
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    /// A read of one key: its version and whether it was a stale copy served while the source
    /// failed (`None` for reads that cannot tell).
    Read(u8, Version, Option<bool>),
    Updated(Version),
    /// The version the shared tier held, if any.
    Held(u8, Option<Version>),
    Failed(Error),
    Done,
}

#[derive(Debug, Clone)]
struct Record {
    index: usize,
    step: Step,
    inst: usize,
    start: u64,
    start_at: Instant,
    /// `None`: the caller gave up.
    end: Option<(u64, Instant)>,
    outcomes: Vec<Outcome>,
    /// Faults met during the call: the source's, the instance's cache tiers' (any operation),
    /// the shared tier's invalidations.
    source_faulty: bool,
    cache_faulty: bool,
    shared_invalidation_faulty: bool,
    /// For a clear: the source's versions when it began.
    versions_before: Vec<Version>,
    /// For an update: the value it wrote (unique).
    written: Option<String>,
    /// For an invalidation or clear: the other instance had loads or fills going at its start.
    other_busy: bool,
}

impl Record {
    fn ended_before(&self, seq: u64) -> bool {
        self.end.is_some_and(|(e, _)| e < seq)
    }
}

async fn perform(w: &World, step: &Step, written: &Mutex<Option<String>>) -> Vec<Outcome> {
    let chain = |i: usize| if i == 0 { &w.a } else { &w.b };
    let read = |k: u8, r: Result<tiercache_core::Fetched<String>>| match r {
        Ok(f) => Outcome::Read(k, f.version, Some(matches!(f.origin, Origin::Stale(_)))),
        Err(e) => Outcome::Failed(e),
    };
    match *step {
        Step::Get(i, k) => {
            let c = chain(i);
            // Both ways in: the synchronous path then the rest, and `fetch` (which does the same).
            let r = if k % 2 == 0 {
                match c.peek(&k) {
                    Ok(f) => Ok(f),
                    Err(miss) => c.fetch_after(&k, miss).await,
                }
            } else {
                c.fetch(&k).await
            };
            vec![read(k, r)]
        }
        Step::GetMany(i, k) => {
            let keys = [k, (k + 1) % KEYS];
            match chain(i).get_many(&keys).await {
                Ok(values) => keys
                    .iter()
                    .zip(values)
                    .map(|(&k, v)| {
                        let version = v.map_or(0, |v| {
                            w.db.version_of(k, &v)
                                .unwrap_or_else(|| panic!("key {k}: value {v:?} never committed"))
                        });
                        Outcome::Read(k, version, None)
                    })
                    .collect(),
                Err(e) => vec![Outcome::Failed(e)],
            }
        }
        Step::Warm(i, k) => match chain(i).warm(&[k, (k + 1) % KEYS], 2).await {
            Ok(_) => vec![Outcome::Done],
            Err(e) => vec![Outcome::Failed(e)],
        },
        Step::Update(i, k) => {
            let value = format!("k{k}/u{}", w.seq.next());
            *written.lock().unwrap() = Some(value.clone());
            match chain(i).update(&k, Arc::new(value)).await {
                Ok(v) => vec![Outcome::Updated(v)],
                Err(e) => vec![Outcome::Failed(e)],
            }
        }
        Step::Invalidate(i, k) => match chain(i).invalidate(&k).await {
            Ok(()) => vec![Outcome::Done],
            Err(e) => vec![Outcome::Failed(e)],
        },
        Step::Clear(i) => match chain(i).clear().await {
            Ok(()) => vec![Outcome::Done],
            Err(e) => vec![Outcome::Failed(e)],
        },
        Step::Probe(k) => vec![Outcome::Held(k, w.shared.version(&k))],
        Step::Edit(_) | Step::Fault(..) | Step::Wait(_) => unreachable!("run by the driver"),
    }
}

/// The instances' names in messages (probes look at the shared tier directly).
const NAMES: [&str; 3] = ["A", "B", "probe"];

const ALL_OPS: [Op; 5] = [Op::Get, Op::Set, Op::Invalidate, Op::Clear, Op::Write];

async fn run_op(w: Arc<World>, index: usize, step: Step, patience: Option<u64>) -> Record {
    let inst = match step {
        Step::Get(i, _)
        | Step::GetMany(i, _)
        | Step::Warm(i, _)
        | Step::Update(i, _)
        | Step::Invalidate(i, _)
        | Step::Clear(i) => i,
        Step::Probe(_) => 2,
        _ => unreachable!(),
    };
    let other = if inst == 1 { &w.a } else { &w.b };
    let other_stats = other.stats();
    let versions_before = (0..KEYS).map(|k| w.db.version(k)).collect();
    let start = w.seq.next();
    let start_at = Instant::now();
    let written = Mutex::new(None);
    let done = match patience {
        Some(us) => tokio::time::timeout(Duration::from_micros(us), perform(&w, &step, &written))
            .await
            .ok(),
        None => Some(perform(&w, &step, &written).await),
    };
    let end = w.seq.next();
    let end_at = Instant::now();
    // A read may have joined a load that began up to a load's length before it.
    let joined = start_at.checked_sub(LOAD_SPAN).unwrap_or(start_at);
    let faulty = |i: usize| w.faults[i].faulty(&ALL_OPS, joined, end_at);
    Record {
        index,
        inst,
        start,
        start_at,
        end: done.is_some().then_some((end, end_at)),
        outcomes: done.unwrap_or_default(),
        source_faulty: faulty(2),
        cache_faulty: faulty(1) || (inst == 0 && faulty(0)),
        shared_invalidation_faulty: w.faults[1].faulty(&[Op::Invalidate], start_at, end_at),
        versions_before,
        written: written.into_inner().unwrap(),
        other_busy: other_stats.loads_in_flight > 0 || other_stats.background_tasks > 0,
        step,
    }
}

/// The checks of rules 1 to 6 over the whole history.
fn check(
    w: &World,
    records: &[Record],
    edits: &[Commit],
    case: Case,
) -> std::result::Result<(), TestCaseError> {
    let commits = w.db.commits.lock().unwrap().clone();
    let value_of = |k: u8, v: Version| commits.iter().find(|c| c.key == k && c.version == v);
    // Whether instance `inst` had nothing that could still fill a tier between `from` and
    // `until`: each of its operations began after `until`, or ended before `from` (and, with
    // background fills, long enough before it for them to have landed).
    let quiet = |inst: usize, from: u64, from_at: Instant, until: u64| {
        records.iter().all(|r| {
            r.inst != inst
                || r.start > until
                || (r.ended_before(from)
                    && (!case.background
                        || r.end.is_some_and(|(_, at)| at + FILL_SLACK <= from_at)))
        })
    };
    // A clear leaves no tombstones: the other instance's fills on their way may land in the
    // emptied tier until the clear's second pass (the longest cache-tier limit later). And
    // that second pass removes what an update or invalidation did meanwhile (a newer version,
    // a tombstone), so a fill that lands after it may put back an old version: the rules do
    // not hold for a read made while a clear settles, nor for a change made while one did.
    let clear_windows: Vec<(u64, Instant, Instant)> = records
        .iter()
        .filter(|c| matches!(c.step, Step::Clear(_)))
        .map(|c| {
            let settled = match c.end {
                Some((_, at)) => at + w.grace[c.inst] + TIER_LIMIT + Duration::from_millis(1),
                // A clear whose caller left runs on: its calls take at most a tier limit each.
                None => c.start_at + w.grace[c.inst] + 2 * MEMORY_LIMIT + 2 * TIER_LIMIT,
            };
            (c.start, c.start_at, settled)
        })
        .collect();
    let settling_clear = |r: &Record| {
        clear_windows
            .iter()
            .any(|&(start, _, settled)| start < r.start && r.start_at < settled)
    };
    let during_clear = |op: &Record| {
        let (_, end_at) = op.end.expect("a change that returned");
        clear_windows
            .iter()
            .any(|&(_, start_at, settled)| start_at <= end_at && op.start_at < settled)
    };
    // Whether read `r` of `key` could not have joined a load of its instance that began
    // before `seq` (another instance's change does not stop this instance's loads from being
    // joined; only a backplane message would).
    let no_older_load = |r: &Record, key: u8, seq: u64| {
        records.iter().all(|g| {
            !matches!(g.step, Step::Get(i, k) if i == r.inst && k == key)
                || g.start >= seq
                || match g.end {
                    Some((end, _)) => end < r.start,
                    None => g.start_at + LOAD_SPAN <= r.start_at,
                }
        })
    };
    // What the shared tier holds, looked at directly: the tier-level rules, with no reader in
    // between to blur them.
    let check_probe = |p: &Record,
                       k: u8,
                       held: Version|
     -> std::result::Result<(), TestCaseError> {
        for c in records.iter().filter(|c| c.ended_before(p.start)) {
            let (c_end, c_end_at) = c.end.unwrap();
            match (&c.step, c.outcomes.first()) {
                // Rule 2, in the tier: once an update returned, the tier holds that version,
                // newer, or nothing (the version rule and tombstones turn away older fills).
                (&Step::Update(_, uk), Some(&Outcome::Updated(v)))
                    if uk == k && !during_clear(c) && !c.shared_invalidation_faulty =>
                {
                    prop_assert!(
                        held >= v,
                        "step {}: the shared tier holds key {k}'s version {held} after step {}'s update on {} returned {v}",
                        p.index,
                        c.index,
                        NAMES[c.inst]
                    );
                }
                // Rule 3, in the tier: once an invalidation's own fills on their way have been
                // refused or taken back, and with the other instance quiet, the tier holds no
                // version older than the edit (a reader's copy goes up, never down).
                (&Step::Invalidate(_, ik), Some(Outcome::Done))
                    if ik == k
                        && !during_clear(c)
                        && !c.other_busy
                        && p.start_at >= c_end_at + OWN_SETTLE[c.inst] =>
                {
                    for e in edits.iter().filter(|e| {
                        e.key == k && e.seq < c.start && quiet(1 - c.inst, e.seq, e.at, c_end)
                    }) {
                        prop_assert!(
                            held >= e.version,
                            "step {}: the shared tier holds key {k}'s version {held} after step {}'s invalidation on {} of edit {}",
                            p.index,
                            c.index,
                            NAMES[c.inst],
                            e.version
                        );
                    }
                }
                _ => {}
            }
        }
        Ok(())
    };
    for r in records {
        let ctx = || format!("step {} {:?} on {}", r.index, r.step, NAMES[r.inst]);
        for o in &r.outcomes {
            match o {
                Outcome::Failed(e) => match r.step {
                    Step::Invalidate(..) | Step::Clear(_) => prop_assert!(
                        r.cache_faulty,
                        "{}: failed with no cache tier faulty: {e}",
                        ctx()
                    ),
                    _ => {
                        prop_assert!(r.source_faulty, "{}: failed with the source up: {e}", ctx());
                        if let (Some(value), false) = (&r.written, e.outcome_unknown()) {
                            // Its value is unique: it must not be in the source's history.
                            prop_assert!(
                                !commits.iter().any(|c| &c.value == value),
                                "{}: a write that failed ({e}) committed",
                                ctx()
                            );
                        }
                    }
                },
                Outcome::Updated(v) => {
                    let Step::Update(_, k) = r.step else {
                        unreachable!()
                    };
                    prop_assert!(
                        value_of(k, *v).map(|c| &c.value) == r.written.as_ref(),
                        "{}: version {v} is not the value written",
                        ctx()
                    );
                }
                Outcome::Read(..) | Outcome::Held(..) | Outcome::Done => {}
            }
        }
        if let (Step::Probe(k), Some(&Outcome::Held(_, Some(held)))) = (&r.step, r.outcomes.first())
        {
            if !settling_clear(r) {
                check_probe(r, *k, held)?;
            }
            continue;
        }
        let Some((end, _)) = r.end else { continue };
        let settling = settling_clear(r);
        for o in &r.outcomes {
            let &Outcome::Read(k, got, stale) = o else {
                continue;
            };
            // Rule 1: a version the source committed before the read ended.
            if got > 0 {
                let c = value_of(k, got);
                prop_assert!(
                    c.is_some_and(|c| c.seq < end),
                    "{}: key {k} read version {got}, not committed before",
                    ctx()
                );
            }
            // Rule 2: updates.
            for u in records.iter().filter(|u| u.ended_before(r.start)) {
                let (Step::Update(_, uk), Some(Outcome::Updated(v))) =
                    (&u.step, u.outcomes.first())
                else {
                    continue;
                };
                if *uk != k {
                    continue;
                }
                let applies = !settling
                    && !during_clear(u)
                    && (u.inst == r.inst
                        || (r.inst == 1
                            && !u.shared_invalidation_faulty
                            && no_older_load(r, k, u.end.unwrap().0)));
                prop_assert!(
                    !applies || got >= *v,
                    "{}: key {k} read version {got} after step {}'s update on {} returned {v}",
                    ctx(),
                    u.index,
                    NAMES[u.inst]
                );
            }
            // Rule 3: invalidations after edits.
            for i in records.iter().filter(|i| i.ended_before(r.start)) {
                let Step::Invalidate(_, ik) = i.step else {
                    continue;
                };
                if ik != k {
                    continue;
                }
                let (i_end, i_end_at) = i.end.unwrap();
                let after_grace =
                    r.start_at >= i_end_at + w.grace[i.inst] + Duration::from_millis(3);
                for e in edits.iter().filter(|e| e.key == k && e.seq < i.start) {
                    // On the same instance: after the second pass, or at once if no fill
                    // that began before the invalidation was on its way (the other
                    // instance's are removed by the second pass; this instance's are taken
                    // back, but a reader may copy one up before).
                    let own = after_grace
                        || (!i.other_busy
                            && quiet(1 - i.inst, e.seq, e.at, i_end)
                            && quiet(i.inst, e.seq, e.at, i.start - 1));
                    let applies = !settling
                        && !during_clear(i)
                        && if i.inst == r.inst {
                            own
                        } else {
                            r.inst == 1
                                && after_grace
                                && no_older_load(r, k, i.start)
                                && matches!(i.outcomes.first(), Some(Outcome::Done))
                        };
                    prop_assert!(
                        !applies || got >= e.version,
                        "{}: key {k} read version {got} after step {}'s invalidation on {} of edit {} (grace passed: {after_grace})",
                        ctx(),
                        i.index,
                        NAMES[i.inst],
                        e.version
                    );
                }
            }
            // Rule 4: clears.
            for c in records
                .iter()
                .filter(|c| c.ended_before(r.start) && c.inst == r.inst)
            {
                if !matches!(
                    (&c.step, c.outcomes.first()),
                    (Step::Clear(_), Some(Outcome::Done))
                ) {
                    continue;
                }
                let (c_end, _) = c.end.unwrap();
                if c.other_busy
                    || !quiet(1 - c.inst, c.start, c.start_at, c_end)
                    || !quiet(c.inst, c.start, c.start_at, c.start - 1)
                {
                    continue;
                }
                let before = c.versions_before[usize::from(k)];
                prop_assert!(
                    got >= before,
                    "{}: key {k} read version {got} after step {}'s clear (source had {before})",
                    ctx(),
                    c.index
                );
            }
            // Rule 5: TTLs (stale copies and reads that cannot tell are exempt).
            if stale == Some(false) {
                for c in commits
                    .iter()
                    .filter(|c| c.key == k && c.at + MAX_TTL + FILL_SLACK <= r.start_at)
                {
                    prop_assert!(
                        got >= c.version,
                        "{}: key {k} fresh read of version {got}, {:?} after version {} was committed",
                        ctx(),
                        r.start_at - c.at,
                        c.version
                    );
                }
            }
        }
    }
    Ok(())
}

async fn run(case: Case, plan: Vec<Planned>) -> std::result::Result<(), TestCaseError> {
    // The chain's own randomness (replay back-off) comes from this thread's generator.
    fastrand::seed(case.seed);
    let w = Arc::new(world(case));
    let mut tasks = Vec::new();
    let mut edits = Vec::new();
    for (index, (step, gap, patience)) in plan.into_iter().enumerate() {
        match step {
            Step::Edit(k) => {
                let value = format!("k{k}/e{}", w.seq.next());
                edits.push(w.db.edit(k, value));
            }
            Step::Fault(target, op, fault) => {
                let fault = fault.map(|hang| if hang { Fault::Hang } else { Fault::Error });
                w.faults[target].set(op, fault);
            }
            Step::Wait(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            step => tasks.push(tokio::spawn(run_op(w.clone(), index, step, patience))),
        }
        tokio::time::sleep(Duration::from_micros(gap)).await;
    }
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await.unwrap());
    }
    if std::env::var_os("MODEL_DEBUG").is_some() {
        // The history, for a failing case (`MODEL_DEBUG=1`).
        for r in &records {
            eprintln!("{r:?}");
        }
    }
    check(&w, &records, &edits, case)?;

    // Rule 7: quiescence.
    for f in &w.faults {
        f.set(None, None);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for k in 0..KEYS {
        w.a.invalidate(&k).await.unwrap();
    }
    for (name, chain) in [("A", &w.a), ("B", &w.b)] {
        chain
            .flush(Duration::from_secs(2))
            .await
            .map_err(|e| TestCaseError::fail(format!("{name} left work undone: {e}")))?;
    }
    for k in 0..KEYS {
        let truth = w.db.version(k);
        if let Some(held) = w.shared.version(&k) {
            prop_assert_eq!(
                held,
                truth,
                "the shared tier holds key {}'s version {}",
                k,
                held
            );
        }
        if let Some(held) = w.memory.get_stale(&k, Duration::MAX).await.unwrap() {
            prop_assert_eq!(
                held.version,
                truth,
                "A's memory holds key {}'s version {}",
                k,
                held.version
            );
        }
        for (name, chain) in [("A", &w.a), ("B", &w.b)] {
            let got = chain.fetch(&k).await.unwrap().version;
            prop_assert_eq!(
                got,
                truth,
                "{} read key {}'s version {} at the end",
                name,
                k,
                got
            );
        }
    }
    Ok(())
}

proptest! {
    // `MODEL_CASES=4096 cargo test --test model` for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn concurrent_steps_keep_the_rules(
        case in case(),
        plan in plan(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(run(case, plan))?;
    }
}
