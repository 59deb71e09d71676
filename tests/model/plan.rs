//! What a case runs: random steps, the races as bursts of steps, and the case's settings.

use super::*;

#[derive(Debug, Clone)]
pub(crate) enum Step {
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

pub(crate) fn step() -> impl Strategy<Value = Step> {
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
pub(crate) type Planned = (Step, u64, Option<u64>);

pub(crate) fn planned() -> impl Strategy<Value = Planned> {
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
pub(crate) fn episode() -> impl Strategy<Value = Vec<Planned>> {
    let short = || 0u64..3_000;
    pub(crate) fn quiet() -> Planned {
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
pub(crate) fn plan() -> impl Strategy<Value = Vec<Planned>> {
    proptest::collection::vec(
        prop_oneof![
            3 => planned().prop_map(|p| vec![p]),
            4 => episode(),
            1 => (0..KEYS).prop_map(|k| vec![(Step::Probe(k), 0, None)]),
        ],
        1..40,
    )
    .prop_map(|parts| parts.into_iter().flatten().collect())
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Case {
    /// Fills of the lower tiers run in the background.
    pub(crate) background: bool,
    /// Memory calls wait a random time too (its synchronous path is then off).
    pub(crate) memory_jitter: bool,
    pub(crate) seed: u64,
}

pub(crate) fn case() -> impl Strategy<Value = Case> {
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
