//! Small helpers the chain and the tiers all need, written once: back-off waits, a TTL with
//! jitter, a task aborted with its owner, an error with its causes on one line.

use std::time::Duration;

use tokio::task::JoinHandle;

/// `first` doubled per failure after the first (`failures` 0 or 1: `first`), at most `longest`.
#[must_use]
pub fn doubling(first: Duration, longest: Duration, failures: u32) -> Duration {
    first
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(longest)
}

/// [`doubling`] with up to half of it off at random, so that instances retrying the same
/// thing do not retry in step. (The thread's `fastrand` generator: a test that seeds it
/// replays the same waits.)
#[must_use]
pub fn jittered_backoff(first: Duration, longest: Duration, failures: u32) -> Duration {
    doubling(first, longest, failures).mul_f64(1.0 - fastrand::f64() / 2.0)
}

/// `ttl` shortened by up to `jitter` of it at random (0: not at all), so that entries filled
/// together do not expire together.
#[must_use]
pub fn jittered_ttl(ttl: Duration, jitter: f64) -> Duration {
    if jitter > 0.0 {
        ttl.mul_f64(1.0 - jitter * fastrand::f64())
    } else {
        ttl
    }
}

/// A task that is aborted when this is dropped (a helper task that must not outlive the task
/// or the value that started it).
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The text of an error and its sources, `: `-separated, for a message that must stand on its
/// own (a log line, an exit message).
#[must_use]
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_jitter_only_shortens() {
        let ms = Duration::from_millis;
        let waits: Vec<_> = (0..6).map(|f| doubling(ms(25), ms(250), f)).collect();
        assert_eq!(waits, [ms(25), ms(25), ms(50), ms(100), ms(200), ms(250)]);
        assert_eq!(doubling(ms(1), ms(u64::MAX / 4), u32::MAX), ms(1 << 16));
        for f in 0..40 {
            let wait = jittered_backoff(ms(25), ms(250), f);
            let full = doubling(ms(25), ms(250), f);
            assert!(wait <= full && wait >= full / 2, "{wait:?} of {full:?}");
            let ttl = jittered_ttl(ms(1000), 0.1);
            assert!((ms(900)..=ms(1000)).contains(&ttl), "{ttl:?}");
        }
        assert_eq!(jittered_ttl(ms(1000), 0.0), ms(1000));
    }

    #[test]
    fn an_error_chain_names_every_cause() {
        let inner = std::io::Error::other("refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(error_chain(&outer), "refused");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connecting")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            error_chain(&Wrap(std::io::Error::other("refused"))),
            "connecting: refused"
        );
    }

    #[tokio::test]
    async fn a_dropped_guard_aborts_its_task() {
        let guard = AbortOnDrop(tokio::spawn(std::future::pending::<()>()));
        let handle = guard.0.abort_handle();
        drop(guard);
        tokio::task::yield_now().await;
        assert!(handle.is_finished());
    }
}
