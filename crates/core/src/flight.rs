//! Single-flight: concurrent loads of one key run once and share the result.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OnceCell;

use crate::tier::Key;

/// In-flight loads by key. Every caller of [`Flights::run`] for a key that is already loading
/// waits for that load instead of starting its own.
///
/// If the caller running the load is cancelled, the next waiter runs it (a property of
/// [`tokio::sync::OnceCell`]), so waiters never hang on a dropped leader. A finished flight is
/// removed by whichever caller sees it finish first, so results are never reused by a later
/// request.
pub(crate) struct Flights<K, T> {
    map: Mutex<HashMap<K, Arc<OnceCell<T>>>>,
}

impl<K: Key, T: Clone> Flights<K, T> {
    pub(crate) fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `load` for `key` unless a load of `key` is in flight, in which case waits for it.
    /// Returns the result and whether this caller ran the load.
    pub(crate) async fn run<F, Fut>(&self, key: &K, load: F) -> (T, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(
                map.entry(key.clone())
                    .or_insert_with(|| Arc::new(OnceCell::new())),
            )
        };
        // Removes the flight when this caller leaves it, finished or dropped at the `.await`.
        let leave = Leave {
            flights: self,
            key,
            cell: &cell,
        };
        let mut led = false;
        let value = cell
            .get_or_init(|| {
                led = true;
                load()
            })
            .await
            .clone();
        drop(leave);
        (value, led)
    }

    /// Detaches `key`'s flight, if any: callers already waiting keep waiting for it, new callers
    /// start a new load. Used after a write, so that no request that starts after the write
    /// returns joins a load that began before it.
    pub(crate) fn forget(&self, key: &K) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Detaches every flight (see [`forget`](Self::forget)). Used after a clear.
    pub(crate) fn forget_all(&self) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Loads in flight now.
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Callers in the flights now, their leaders included (each holds its flight's cell while
    /// it is in it, and the map one more).
    pub(crate) fn callers(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|cell| Arc::strong_count(cell) - 1)
            .sum()
    }
}

/// A caller's place in a flight. When it leaves, the flight is removed from the map if it
/// finished, or if no one else waits for it (its only caller was dropped before the load
/// finished): otherwise the entry would stay until the next load of the key.
struct Leave<'a, K: Key, T: Clone> {
    flights: &'a Flights<K, T>,
    key: &'a K,
    cell: &'a Arc<OnceCell<T>>,
}

impl<K: Key, T: Clone> Drop for Leave<'_, K, T> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The map's reference and this caller's are the only ones: nobody else waits.
        let alone = Arc::strong_count(self.cell) <= 2;
        if (self.cell.initialized() || alone)
            && map.get(self.key).is_some_and(|c| Arc::ptr_eq(c, self.cell))
        {
            map.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_load() {
        let flights = Arc::new(Flights::<String, u64>::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (flights, loads, gate) = (flights.clone(), loads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(&"k".to_string(), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        42
                    })
                    .await
            }));
        }
        // Wait until every task has joined the flight, then release the one load.
        while flights.callers() < 100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(flights.len(), 1);
        gate.notify_one();
        let mut leaders = 0;
        for t in tasks {
            let (v, led) = t.await.unwrap();
            assert_eq!(v, 42);
            leaders += usize::from(led);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(flights.len(), 0, "finished flights are removed");
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_the_load_to_a_waiter() {
        let flights = Arc::new(Flights::<u32, u32>::new());
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(&1, std::future::pending::<u32>).await })
        };
        tokio::task::yield_now().await;
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(&1, || async { 7 }).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        let (v, led) = follower.await.unwrap();
        assert_eq!(v, 7);
        assert!(
            led,
            "the follower ran the load after the leader was cancelled"
        );
    }

    #[tokio::test]
    async fn a_flight_whose_only_caller_is_dropped_is_removed() {
        let flights = Flights::<u32, u32>::new();
        let dropped = tokio::time::timeout(
            Duration::from_millis(5),
            flights.run(&1, std::future::pending),
        )
        .await;
        assert!(dropped.is_err());
        assert_eq!(flights.len(), 0, "no flight left behind");
    }

    #[tokio::test]
    async fn a_dropped_caller_leaves_the_flight_to_those_still_waiting() {
        let flights = Arc::new(Flights::<u32, u32>::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let waiter = {
            let (flights, gate) = (flights.clone(), gate.clone());
            tokio::spawn(async move {
                flights
                    .run(&1, || async move {
                        gate.notified().await;
                        7
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let dropped =
            tokio::time::timeout(Duration::from_millis(5), flights.run(&1, || async { 9 })).await;
        assert!(dropped.is_err(), "joined the waiter's flight and gave up");
        assert_eq!(flights.len(), 1, "the waiter's flight stays");
        assert_eq!(flights.callers(), 1, "the dropped caller left it");
        gate.notify_one();
        assert_eq!(waiter.await.unwrap(), (7, true));
        assert_eq!((flights.len(), flights.callers()), (0, 0));
    }

    #[tokio::test]
    async fn forget_starts_a_new_flight() {
        let flights = Flights::<u32, u32>::new();
        let (a, _) = flights.run(&1, || async { 1 }).await;
        flights.forget(&1);
        let (b, led) = flights.run(&1, || async { 2 }).await;
        assert_eq!((a, b, led), (1, 2, true));
    }
}
