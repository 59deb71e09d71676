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
//! The rules (the code each guards in brackets; `docs/testing.md` has the mutations each catches):
//! 1. **Values**: every answer is a value the source committed at that version (0: not found);
//!    a write that failed with a known outcome is never read.
//! 2. **Updates** (versions, tombstones, marks): a read that starts after an update returned
//!    version `v` on the same instance returns `v` or newer; so does a read on B after an
//!    update on A whose shared-tier invalidation did not fail (unless B's read joined a load of
//!    B's that began before the update), and so does the shared tier itself, looked at directly.
//! 3. **Invalidation** (manual invalidation, bottom-first order, the invalidation's mark,
//!    tombstones): after an edit behind the chain's back and an invalidation on X that began
//!    after it, a read on X that starts after the invalidation returned sees the edit: at once
//!    if no fill that began before the invalidation was on its way, after the second pass in
//!    any case; the shared tier holds nothing older once X's own fills were taken back (the
//!    other instance quiet); a read on B after an invalidation on A that returned `Ok` sees the
//!    edit after the second pass.
//! 4. **Clear**: after `clear` returned `Ok` on X, with both instances' earlier work done, a
//!    read on X returns at least what the source held when the clear began.
//! 5. **TTLs**: a fresh read starting the longest TTL after a write (plus the longest time a
//!    fill can take) returns it or newer.
//! 6. **Errors**: a read, update or warm fails only if the source was faulty meanwhile (or
//!    while the load it joined ran); an invalidation or clear only if one of its instance's
//!    cache tiers was.
//! 7. **Quiescence**: at the end, faults cleared, every key invalidated on A and both instances
//!    flushed, every tier holds the source's version of each key or nothing, and both read it.
//!
//! The exemptions (`check.rs`) are the chain's documented limits (`docs/architecture.md`,
//! "Limits"): a clear's settling window, a fill of this instance copied up before it was taken
//! back, a read joining its own instance's older load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tiercache_core::async_trait;
use tiercache_core::{
    BreakerPolicy, CacheTier, Clock, Entry, Error, Origin, Result, Source, TierStats, TieredCache,
    TimeSource, Timestamp, Version, Written,
};
use tiercache_memory::MemoryTier;
use tiercache_testkit::{FakeSource, FakeTier, Fault, FaultSwitch, Faulty, Op};
use tokio::time::Instant;

mod check;
mod found;
mod history;
mod plan;
mod world;

use check::check;
use history::*;
use plan::*;
use world::*;

const KEYS: u8 = 4;
/// The longest cache TTL (the shared tier's): after this, nothing cached before is fresh.
const MAX_TTL: Duration = Duration::from_secs(600);
/// The time limit of a shared-tier call: no fill lands later than this after it was sent.
const TIER_LIMIT: Duration = Duration::from_millis(10);
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
        cases: std::env::var("MODEL_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1024),
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

/// The case found during the cargo-mutants rerun of 2026-12-02 (docs/testing.md, "A case the
/// model found"), replayed as it was shrunk: a lower tier's fill waited for the set above it
/// and landed after another instance's second pass.
#[test]
fn the_found_case() {
    let (case, plan) = found::stale_read_after_invalidation();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(run(case, plan)).unwrap();
}
