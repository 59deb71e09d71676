//! [`BackplaneHub`]: an in-process backplane, so that tests can run several chain instances
//! that invalidate each other, with delivery delays and lost messages on demand.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tiercache_core::{Backplane, Change, Changes, Key, Result, TieredCache, Value, Version};

struct Member<K, V> {
    id: u64,
    chain: OnceLock<TieredCache<K, V>>,
}

struct Hub<K, V> {
    members: Mutex<Vec<Arc<Member<K, V>>>>,
    next_id: AtomicU64,
    /// Largest random delivery delay (zero: deliver before `publish` returns).
    max_delay: Mutex<Duration>,
    rng: Mutex<fastrand::Rng>,
    dropping: AtomicBool,
    delivered: AtomicU64,
}

/// An in-process backplane joining several chains. Cheap to clone; clones are the same hub.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tiercache_core::Result<()> {
/// use std::sync::Arc;
/// use tiercache_core::{Origin, TieredCache};
/// use tiercache_testkit::{BackplaneHub, FakeSource, FakeTier};
///
/// let hub = BackplaneHub::new(1);
/// let (db, shared) = (FakeSource::new("db"), FakeTier::cache("redis"));
/// let mut instances = Vec::new();
/// for _ in 0..2 {
///     let handle = hub.handle();
///     let chain = TieredCache::builder()
///         .tier(FakeTier::<u8, String>::cache("memory").with_peek())
///         .tier(shared.clone())
///         .source(db.clone())
///         .backplane(Arc::new(handle.clone()))
///         .build()?;
///     handle.attach(chain.clone());
///     instances.push(chain);
/// }
/// instances[0].update(&1, Arc::new("v1".into())).await?;
/// instances[1].get(&1).await?; // now in instance 1's memory
/// instances[0].update(&1, Arc::new("v2".into())).await?; // evicts it there
/// assert_eq!(instances[1].fetch(&1).await?.version, 2);
/// # Ok(()) }
/// ```
pub struct BackplaneHub<K, V> {
    hub: Arc<Hub<K, V>>,
}

impl<K, V> Clone for BackplaneHub<K, V> {
    fn clone(&self) -> Self {
        BackplaneHub {
            hub: Arc::clone(&self.hub),
        }
    }
}

impl<K, V> fmt::Debug for BackplaneHub<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackplaneHub")
            .field("delivered", &self.hub.delivered.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// One instance's end of a [`BackplaneHub`]: give it to the chain's builder, then
/// [`attach`](BackplaneHandle::attach) the built chain.
pub struct BackplaneHandle<K, V> {
    hub: Arc<Hub<K, V>>,
    me: Arc<Member<K, V>>,
}

impl<K, V> Clone for BackplaneHandle<K, V> {
    fn clone(&self) -> Self {
        BackplaneHandle {
            hub: Arc::clone(&self.hub),
            me: Arc::clone(&self.me),
        }
    }
}

impl<K: Key, V: Value> BackplaneHub<K, V> {
    /// A hub whose random delivery delays are drawn from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        BackplaneHub {
            hub: Arc::new(Hub {
                members: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(0),
                max_delay: Mutex::new(Duration::ZERO),
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
                dropping: AtomicBool::new(false),
                delivered: AtomicU64::new(0),
            }),
        }
    }

    /// A new member's handle.
    #[must_use]
    pub fn handle(&self) -> BackplaneHandle<K, V> {
        let me = Arc::new(Member {
            id: self.hub.next_id.fetch_add(1, Ordering::Relaxed),
            chain: OnceLock::new(),
        });
        self.hub
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&me));
        BackplaneHandle {
            hub: Arc::clone(&self.hub),
            me,
        }
    }

    /// Delivers each message after a random delay up to `max` (in a spawned task), instead of
    /// before `publish` returns.
    pub fn set_max_delay(&self, max: Duration) {
        *self
            .hub
            .max_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = max;
    }

    /// Loses every message while `on` (a subscription that dropped).
    pub fn set_dropping(&self, on: bool) {
        self.hub.dropping.store(on, Ordering::Relaxed);
    }

    /// Messages delivered so far (one per receiving instance).
    #[must_use]
    pub fn delivered(&self) -> u64 {
        self.hub.delivered.load(Ordering::Relaxed)
    }
}

impl<K: Key, V: Value> BackplaneHandle<K, V> {
    /// Connects the built chain, which then receives the other instances' messages.
    ///
    /// # Panics
    /// If called twice.
    pub fn attach(&self, chain: TieredCache<K, V>) {
        assert!(
            self.me.chain.set(chain).is_ok(),
            "a backplane handle serves one chain"
        );
    }
}

#[async_trait]
impl<K: Key, V: Value> Backplane<K, V> for BackplaneHandle<K, V> {
    async fn publish(
        &self,
        key: &K,
        version: Option<Version>,
        value: Option<Arc<V>>,
    ) -> Result<()> {
        if self.hub.dropping.load(Ordering::Relaxed) {
            return Ok(());
        }
        let others: Vec<Arc<Member<K, V>>> = self
            .hub
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|m| m.id != self.me.id)
            .cloned()
            .collect();
        let max = *self
            .hub
            .max_delay
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for member in others {
            let Some(chain) = member.chain.get().cloned() else {
                continue;
            };
            self.hub.delivered.fetch_add(1, Ordering::Relaxed);
            if max.is_zero() {
                chain
                    .apply(Changes::from_backplane(vec![Change::announced(
                        key.clone(),
                        version,
                        value.clone(),
                    )]))
                    .await;
            } else {
                let delay = max.mul_f64(
                    self.hub
                        .rng
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .f64(),
                );
                let (key, value) = (key.clone(), value.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    chain
                        .apply(Changes::from_backplane(vec![Change::announced(
                            key, version, value,
                        )]))
                        .await;
                });
            }
        }
        Ok(())
    }
}
