//! Running a step and writing down what it answered, when, and what faults it met.

use super::*;

#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A read of one key: its version and whether it was a stale copy served while the source
    /// failed (`None` for reads that cannot tell).
    Read(u8, Version, Option<bool>),
    Updated(Version),
    /// The version the shared tier held, if any.
    Held(Option<Version>),
    Failed(Error),
    Done,
}

#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) index: usize,
    pub(crate) step: Step,
    pub(crate) inst: usize,
    pub(crate) start: u64,
    pub(crate) start_at: Instant,
    /// `None`: the caller gave up.
    pub(crate) end: Option<(u64, Instant)>,
    pub(crate) outcomes: Vec<Outcome>,
    /// Faults met during the call: the source's, the instance's cache tiers' (any operation),
    /// the shared tier's invalidations.
    pub(crate) source_faulty: bool,
    pub(crate) cache_faulty: bool,
    pub(crate) shared_invalidation_faulty: bool,
    /// For a clear: the source's versions when it began.
    pub(crate) versions_before: Vec<Version>,
    /// For an update: the value it wrote (unique).
    pub(crate) written: Option<String>,
    /// For an invalidation or clear: the other instance had loads or fills going at its start.
    pub(crate) other_busy: bool,
}

impl Record {
    pub(crate) fn ended_before(&self, seq: u64) -> bool {
        self.end.is_some_and(|(e, _)| e < seq)
    }
}

pub(crate) async fn perform(
    w: &World,
    step: &Step,
    written: &Mutex<Option<String>>,
) -> Vec<Outcome> {
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
        Step::Probe(k) => vec![Outcome::Held(w.shared.version(&k))],
        Step::Edit(_) | Step::Fault(..) | Step::Wait(_) => unreachable!("run by the driver"),
    }
}

/// The instances' names in messages (probes look at the shared tier directly).
pub(crate) const NAMES: [&str; 3] = ["A", "B", "probe"];

pub(crate) const ALL_OPS: [Op; 5] = [Op::Get, Op::Set, Op::Invalidate, Op::Clear, Op::Write];

pub(crate) async fn run_op(
    w: Arc<World>,
    index: usize,
    step: Step,
    patience: Option<u64>,
) -> Record {
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
