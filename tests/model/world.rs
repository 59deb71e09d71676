//! The model's world: one clock, the fault switches that remember when they were on, the
//! source that writes down every commit, and the two instances.

use super::*;

/// The chain's and the tiers' clock: tokio's (paused) time.
pub(crate) struct TokioTime(pub(crate) Instant);

impl TimeSource for TokioTime {
    fn now(&self) -> Timestamp {
        Timestamp::from_duration(Duration::from_secs(3600) + self.0.elapsed())
    }
}

/// Every event gets the next number: the history's order.
#[derive(Default)]
pub(crate) struct Seq(pub(crate) AtomicU64);

impl Seq {
    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A change of a fault switch: when, and which of [`ALL_OPS`] were faulty after it.
pub(crate) type Change = (Instant, [bool; 5]);

/// A fault switch that remembers when each change was made, to tell whether a call ran while
/// a fault was on.
#[derive(Clone, Default)]
pub(crate) struct Tracked {
    pub(crate) switch: FaultSwitch,
    pub(crate) changes: Arc<Mutex<Vec<Change>>>,
}

impl Tracked {
    pub(crate) fn set(&self, op: Option<Op>, fault: Option<Fault>) {
        match (op, fault) {
            (_, None) => self.switch.clear(),
            (None, Some(f)) => self.switch.set(f),
            (Some(op), Some(f)) => self.switch.set_for(op, f),
        }
        let on = ALL_OPS.map(|op| self.switch.is_active(op));
        self.changes.lock().unwrap().push((Instant::now(), on));
    }

    /// Whether one of `ops` was faulty at some time between `from` and `to`.
    pub(crate) fn faulty(&self, ops: &[Op], from: Instant, to: Instant) -> bool {
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
pub(crate) struct Commit {
    pub(crate) key: u8,
    pub(crate) version: Version,
    pub(crate) value: String,
    pub(crate) seq: u64,
    pub(crate) at: Instant,
}

/// The source: a fake database that writes down every commit, with its faults and jitter.
#[derive(Clone)]
pub(crate) struct Db {
    pub(crate) data: FakeSource<u8, String>,
    pub(crate) faults: Tracked,
    pub(crate) jitter: FaultSwitch,
    pub(crate) commits: Arc<Mutex<Vec<Commit>>>,
    pub(crate) seq: Arc<Seq>,
}

impl Db {
    pub(crate) fn commit(&self, key: u8, version: Version, value: String) {
        self.commits.lock().unwrap().push(Commit {
            key,
            version,
            value,
            seq: self.seq.next(),
            at: Instant::now(),
        });
    }
    /// A write behind every cache's back.
    pub(crate) fn edit(&self, key: u8, value: String) -> Commit {
        let version = self.data.put(key, value.clone());
        self.commit(key, version, value);
        self.commits.lock().unwrap().last().unwrap().clone()
    }
    pub(crate) fn version(&self, key: u8) -> Version {
        self.data.version(&key).unwrap_or(0)
    }
    /// The version `value` of `key` was committed at, if it was.
    pub(crate) fn version_of(&self, key: u8, value: &str) -> Option<Version> {
        let commits = self.commits.lock().unwrap();
        commits
            .iter()
            .find(|c| c.key == key && c.value == value)
            .map(|c| c.version)
    }
    pub(crate) async fn faulty<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let jittered = self.jitter.run("db", op, async { Ok(()) }).await;
        jittered?;
        self.faults.switch.run("db", op, call).await
    }
}

#[async_trait]
impl Source<u8, String> for Db {
    fn name(&self) -> &str {
        "db"
    }
    async fn get(&self, key: &u8) -> Result<Option<Entry<String>>> {
        self.faulty(Op::Get, self.data.get(key)).await
    }
    async fn get_many(&self, keys: &[u8]) -> Result<Vec<Option<Entry<String>>>> {
        self.faulty(Op::Get, self.data.get_many(keys)).await
    }
    async fn write(
        &self,
        key: &u8,
        value: Arc<String>,
        expected: Option<Version>,
    ) -> Result<Written> {
        let this = self.clone();
        let key = *key;
        self.faulty(Op::Write, async move {
            let written = this.data.write(&key, Arc::clone(&value), expected).await?;
            if let Written::Changed(version) = written {
                this.commit(key, version, value.to_string());
            }
            Ok(written)
        })
        .await
    }
    async fn delete(&self, _: &u8, _: Option<Version>) -> Result<Written> {
        Err(Error::unsupported("db", "delete"))
    }
    fn stats(&self) -> TierStats {
        self.data.stats()
    }
}

pub(crate) struct World {
    pub(crate) a: TieredCache<u8, String>,
    pub(crate) b: TieredCache<u8, String>,
    pub(crate) memory: Arc<MemoryTier<u8, String>>,
    pub(crate) shared: FakeTier<u8, String>,
    pub(crate) db: Db,
    /// Faults of memory, the shared tier and the source.
    pub(crate) faults: [Tracked; 3],
    pub(crate) seq: Arc<Seq>,
    /// Each instance's second-pass delay (its longest cache-tier limit).
    pub(crate) grace: [Duration; 2],
}

pub(crate) fn world(case: Case) -> World {
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
        data: FakeSource::new("db"),
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
