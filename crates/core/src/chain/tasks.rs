//! The chain's background work: updates and invalidations finishing after their caller left,
//! back-fills, settling writes whose outcome is unknown. Counted, so that
//! [`TieredCache::flush`](super::TieredCache::flush) can wait for them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Default)]
pub(super) struct Tasks {
    running: AtomicUsize,
    idle: Notify,
}

/// One running task's place in the count; leaves it when dropped (the task ended, panicked or
/// was aborted).
struct Busy(Arc<Tasks>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tasks {
    /// Runs `work` in a task of its own, counted until it ends.
    pub(super) fn spawn<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.running.fetch_add(1, Ordering::AcqRel);
        let busy = Busy(Arc::clone(self));
        tokio::spawn(async move {
            let _busy = busy;
            work.await
        })
    }

    /// Tasks running now.
    pub(super) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Waits until no task runs, or until `deadline`; returns whether none runs.
    pub(super) async fn idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running() == 0;
            }
        }
    }
}

/// The result of a task the caller waits for: its panic is the caller's panic.
pub(super) async fn join<T>(task: JoinHandle<crate::error::Result<T>>) -> crate::error::Result<T> {
    match task.await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Aborted: the runtime is shutting down.
        Err(error) => Err(crate::error::Error::unavailable("chain", error)),
    }
}
