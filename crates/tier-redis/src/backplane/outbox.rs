//! What the backplane has to send, and the task that sends it: fresh messages in order, failed
//! ones kept (the latest version per key) and retried, a "flush everything" past the bound.
//! Publishing never waits for Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};

use tiercache_core::Version;

use super::wire::Notice;
use super::{Inner, MAX_PENDING, RETRY_EVERY, RedisBackplane, SEND_BATCH};

/// What the sender has to send: fresh messages in order, then retries.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) fresh: VecDeque<Notice>,
    /// Messages that failed, the latest version per key (their values dropped: a receiver
    /// evicts instead of replacing).
    retry: HashMap<String, Option<Version>>,
    /// Too many piled up: the next send is "flush everything", and they are dropped.
    overflowed: bool,
    /// Messages in the send running now.
    pub(super) sending: usize,
    /// The last send failed: the sender waits before the next.
    pub(super) failing: bool,
}

impl Outbox {
    pub(super) fn len(&self) -> usize {
        self.fresh.len() + self.retry.len() + usize::from(self.overflowed) + self.sending
    }

    /// Keeps a message that failed (or could not be sent), coalesced per key.
    pub(super) fn keep(&mut self, notice: Notice) {
        match notice {
            Notice::Flush => self.overflowed = true,
            Notice::Key(key, version, _) => {
                if self.retry.len() >= MAX_PENDING && !self.retry.contains_key(&key) {
                    self.overflow();
                    return;
                }
                let slot = self.retry.entry(key).or_insert(version);
                *slot = match (*slot, version) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
        }
    }

    pub(super) fn overflow(&mut self) {
        self.overflowed = true;
        self.retry.clear();
        self.fresh.clear();
    }

    /// The next messages to send, in order: a flush if one is owed, then retries, then fresh
    /// ones.
    pub(super) fn take(&mut self) -> Vec<Notice> {
        let mut batch = Vec::new();
        if std::mem::take(&mut self.overflowed) {
            batch.push(Notice::Flush);
        }
        let retries: Vec<String> = self.retry.keys().take(SEND_BATCH).cloned().collect();
        for key in retries {
            let version = self.retry.remove(&key).expect("listed");
            batch.push(Notice::Key(key, version, None));
        }
        while batch.len() < SEND_BATCH {
            let Some(notice) = self.fresh.pop_front() else {
                break;
            };
            batch.push(notice);
        }
        self.sending = batch.len();
        batch
    }
}

/// The sender: sends what is queued, in order, and keeps what fails for a retry every
/// [`RETRY_EVERY`]. Logs when publishing starts failing and when it works again, not per
/// message. Ends with the backplane.
pub(super) async fn send_queued(backplane: Weak<Inner>) {
    loop {
        let failed = {
            let Some(inner) = backplane.upgrade() else {
                return;
            };
            let this = RedisBackplane { inner };
            let batch = this.outbox().take();
            if batch.is_empty() {
                this.inner.drained.notify_waiters();
                // A message queued since `take` left a permit: this returns at once.
                let queued = Arc::clone(&this.inner.queued);
                drop(this);
                queued.notified().await;
                continue;
            }
            let result = this.send(&batch).await;
            let mut outbox = this.outbox();
            outbox.sending = 0;
            let failed = result.is_err();
            if failed {
                this.inner.publish_errors.incr();
                for notice in batch {
                    outbox.keep(notice);
                }
            }
            if std::mem::replace(&mut outbox.failing, failed) != failed {
                match &result {
                    Err(error) => tracing::warn!(%error, "backplane cannot publish; retrying"),
                    Ok(()) => tracing::info!("backplane publishes again"),
                }
            }
            failed
        };
        if failed {
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, version: Option<Version>) -> Notice {
        Notice::Key(k.into(), version, None)
    }

    #[test]
    fn a_failed_message_is_kept_once_per_key_at_its_latest_version() {
        let mut outbox = Outbox::default();
        outbox.keep(key("a", Some(3)));
        outbox.keep(Notice::Key("a".into(), Some(5), Some("{}".into())));
        outbox.keep(key("a", Some(4)));
        assert_eq!(
            outbox.retry.get("a"),
            Some(&Some(5)),
            "the latest version, no value"
        );
        outbox.keep(key("a", None));
        assert_eq!(
            outbox.retry.get("a"),
            Some(&None),
            "a manual invalidation drops all"
        );
        outbox.keep(key("a", Some(9)));
        assert_eq!(outbox.retry.get("a"), Some(&None));
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn past_the_retry_bound_everything_kept_becomes_one_flush_sent_first() {
        let mut outbox = Outbox::default();
        for i in 0..MAX_PENDING {
            outbox.keep(key(&i.to_string(), Some(1)));
        }
        assert!(!outbox.overflowed);
        outbox.fresh.push_back(key("fresh", Some(1)));
        // A key already kept is coalesced, not counted again.
        outbox.keep(key("0", Some(2)));
        assert!(!outbox.overflowed);
        outbox.keep(key("one too many", Some(1)));
        assert!(outbox.overflowed);
        assert!(outbox.retry.is_empty() && outbox.fresh.is_empty());
        assert_eq!(outbox.len(), 1);

        outbox.fresh.push_back(key("after", Some(1)));
        let batch = outbox.take();
        assert_eq!(batch, vec![Notice::Flush, key("after", Some(1))]);
        assert!(!outbox.overflowed);
    }

    #[test]
    fn a_send_takes_retries_before_fresh_messages_up_to_a_batch() {
        let mut outbox = Outbox::default();
        outbox.keep(key("old", Some(1)));
        for i in 0..SEND_BATCH {
            outbox.fresh.push_back(key(&i.to_string(), Some(2)));
        }
        let batch = outbox.take();
        assert_eq!(batch.len(), SEND_BATCH);
        assert_eq!(batch[0], key("old", Some(1)));
        assert_eq!(batch[1], key("0", Some(2)), "fresh ones in order");
        assert_eq!(outbox.sending, SEND_BATCH);
        assert_eq!(outbox.fresh.len(), 1, "the rest waits for the next send");
    }
}
