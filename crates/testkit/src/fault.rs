//! Fault injection: switches that make a tier's calls fail, slow down, hang or wait at a gate,
//! and [`Faulty`], a wrapper that puts a switch in front of any tier.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tiercache_core::{
    CacheTier, Entry, Error, Key, Peek, Result, Source, TierStats, Value, Version, Written,
};
use tokio::sync::watch;

/// A tier operation, to aim a fault at one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `get`, `get_many` and `get_stale`.
    Get,
    /// `set`.
    Set,
    /// `invalidate`.
    Invalidate,
    /// `clear`.
    Clear,
    /// A source's `write` and `delete`.
    Write,
}

/// What a faulty call does.
#[derive(Clone)]
pub enum Fault {
    /// Fails at once with a transient [`Error::Unavailable`].
    Error,
    /// Waits this long, then runs normally.
    Delay(Duration),
    /// Waits a random time up to this long (drawn from the switch's seeded generator), then
    /// runs normally: with tokio's paused clock, a reproducible interleaving per seed.
    Jitter(Duration),
    /// Never answers (until the caller's time limit gives up on it).
    Hang,
    /// Runs, then holds its answer until the gate opens: a slow reader or writer whose work is
    /// done but not yet delivered.
    Hold(Gate),
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Error => f.write_str("Error"),
            Fault::Delay(d) => f.debug_tuple("Delay").field(d).finish(),
            Fault::Jitter(d) => f.debug_tuple("Jitter").field(d).finish(),
            Fault::Hang => f.write_str("Hang"),
            Fault::Hold(_) => f.write_str("Hold"),
        }
    }
}

/// The error a [`Fault::Error`] injects.
#[derive(Debug, Clone, Copy)]
pub struct InjectedFault;

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected fault")
    }
}

impl std::error::Error for InjectedFault {}

/// A gate that [`Fault::Hold`] calls wait at. Cheap to clone; clones are the same gate.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tiercache_testkit::Gate;
///
/// let gate = Gate::new();
/// let waiter = {
///     let gate = gate.clone();
///     tokio::spawn(async move { gate.pass().await })
/// };
/// gate.arrived(1).await; // the waiter is at the gate
/// gate.open();
/// waiter.await.unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct Gate {
    open: Arc<watch::Sender<bool>>,
    arrivals: Arc<watch::Sender<usize>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// A closed gate.
    #[must_use]
    pub fn new() -> Self {
        Gate {
            open: Arc::new(watch::channel(false).0),
            arrivals: Arc::new(watch::channel(0).0),
        }
    }

    /// Arrives at the gate and waits until it is open.
    pub async fn pass(&self) {
        self.arrivals.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = open.wait_for(|o| *o).await;
    }

    /// Waits until at least `n` calls have arrived at the gate.
    pub async fn arrived(&self, n: usize) {
        let mut arrivals = self.arrivals.subscribe();
        let _ = arrivals.wait_for(|a| *a >= n).await;
    }

    /// Opens the gate: every waiting call, and every later one, passes.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A switch of faults for one tier, all operations or one at a time. Cheap to clone; clones
/// share the switch.
#[derive(Clone)]
pub struct FaultSwitch {
    faults: Arc<Mutex<HashMap<Option<Op>, Fault>>>,
    rng: Arc<Mutex<fastrand::Rng>>,
}

impl Default for FaultSwitch {
    fn default() -> Self {
        Self::with_seed(0)
    }
}

impl fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_map().entries(faults.iter()).finish()
    }
}

impl FaultSwitch {
    /// A switch with no fault on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A switch whose [`Fault::Jitter`] delays are drawn from `seed`.
    #[must_use]
    pub fn with_seed(seed: u64) -> Self {
        FaultSwitch {
            faults: Arc::default(),
            rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(seed))),
        }
    }

    /// Turns `fault` on for every operation.
    pub fn set(&self, fault: Fault) {
        self.lock().insert(None, fault);
    }

    /// Turns `fault` on for one operation (it overrides the all-operations fault).
    pub fn set_for(&self, op: Op, fault: Fault) {
        self.lock().insert(Some(op), fault);
    }

    /// Turns every fault off.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Whether any fault would hit `op` now.
    #[must_use]
    pub fn is_active(&self, op: Op) -> bool {
        self.current(op).is_some()
    }

    /// The fault that hits `op` now.
    #[must_use]
    pub fn current(&self, op: Op) -> Option<Fault> {
        let faults = self.lock();
        faults.get(&Some(op)).or_else(|| faults.get(&None)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Option<Op>, Fault>> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `call` for `op` of tier `tier` under the fault that is on now.
    pub async fn run<T>(
        &self,
        tier: &str,
        op: Op,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.current(op) {
            None => call.await,
            Some(Fault::Error) => Err(Error::unavailable(tier, InjectedFault)),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                call.await
            }
            Some(Fault::Jitter(max)) => {
                let fraction = self
                    .rng
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .f64();
                tokio::time::sleep(max.mul_f64(fraction)).await;
                call.await
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Hold(gate)) => {
                let result = call.await;
                gate.pass().await;
                result
            }
        }
    }
}

/// Wraps any tier with a [`FaultSwitch`]. With no fault on, every call goes straight through
/// (the synchronous `peek` path included).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tiercache_core::CacheTier;
/// use tiercache_testkit::{FakeTier, Fault, Faulty};
///
/// let redis_like = Faulty::new(FakeTier::<String, String>::cache("redis"));
/// redis_like.faults().set(Fault::Error);
/// assert!(redis_like.get(&"k".to_string()).await.unwrap_err().is_transient());
/// redis_like.faults().clear();
/// assert!(redis_like.get(&"k".to_string()).await.unwrap().is_none());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Faulty<T> {
    inner: T,
    faults: FaultSwitch,
}

impl<T> Faulty<T> {
    /// Wraps `inner` with a switch that has no fault on.
    pub fn new(inner: T) -> Self {
        Self::with_switch(inner, FaultSwitch::new())
    }

    /// Wraps `inner` with `faults` (for example one made by [`FaultSwitch::with_seed`]).
    pub fn with_switch(inner: T, faults: FaultSwitch) -> Self {
        Faulty { inner, faults }
    }

    /// The switch.
    pub fn faults(&self) -> &FaultSwitch {
        &self.faults
    }

    /// The wrapped tier.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Unwraps the tier.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

#[async_trait]
impl<K: Key, V: Value, T: CacheTier<K, V>> CacheTier<K, V> for Faulty<T> {
    fn name(&self) -> &str {
        CacheTier::name(&self.inner)
    }

    fn peek(&self, key: &K) -> Peek<V> {
        if self.faults.is_active(Op::Get) {
            // Send the chain down the asynchronous path, where the fault applies.
            Peek::Unsupported
        } else {
            self.inner.peek(key)
        }
    }

    fn is_local(&self) -> bool {
        self.inner.is_local()
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        self.faults
            .run(CacheTier::name(self), Op::Get, self.inner.get(key))
            .await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        self.faults
            .run(CacheTier::name(self), Op::Get, self.inner.get_many(keys))
            .await
    }

    async fn get_stale(&self, key: &K, max_stale: Duration) -> Result<Option<Entry<V>>> {
        self.faults
            .run(
                CacheTier::name(self),
                Op::Get,
                self.inner.get_stale(key, max_stale),
            )
            .await
    }

    async fn set(&self, key: &K, entry: Entry<V>) -> Result<bool> {
        self.faults
            .run(CacheTier::name(self), Op::Set, self.inner.set(key, entry))
            .await
    }

    async fn invalidate(&self, key: &K, version: Option<Version>) -> Result<()> {
        self.faults
            .run(
                CacheTier::name(self),
                Op::Invalidate,
                self.inner.invalidate(key, version),
            )
            .await
    }

    async fn clear(&self) -> Result<()> {
        self.faults
            .run(CacheTier::name(self), Op::Clear, self.inner.clear())
            .await
    }

    fn stats(&self) -> TierStats {
        self.inner.stats()
    }
}

#[async_trait]
impl<K: Key, V: Value, T: Source<K, V>> Source<K, V> for Faulty<T> {
    fn name(&self) -> &str {
        Source::name(&self.inner)
    }

    async fn get(&self, key: &K) -> Result<Option<Entry<V>>> {
        let name = Source::name(self);
        self.faults.run(name, Op::Get, self.inner.get(key)).await
    }

    async fn get_many(&self, keys: &[K]) -> Result<Vec<Option<Entry<V>>>> {
        let name = Source::name(self);
        self.faults
            .run(name, Op::Get, self.inner.get_many(keys))
            .await
    }

    async fn write(&self, key: &K, value: Arc<V>, expected: Option<Version>) -> Result<Written> {
        let name = Source::name(self);
        self.faults
            .run(name, Op::Write, self.inner.write(key, value, expected))
            .await
    }

    async fn delete(&self, key: &K, expected: Option<Version>) -> Result<Written> {
        let name = Source::name(self);
        self.faults
            .run(name, Op::Write, self.inner.delete(key, expected))
            .await
    }

    fn stats(&self) -> TierStats {
        self.inner.stats()
    }
}
