//! The subscriber: (re)subscribes with a jittered back-off, flushes the local tiers each time it
//! does (messages sent before were not heard), applies the other instances' messages through
//! the chain's one door, and checks the subscription with a PING every second.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tiercache_core::util::AbortOnDrop;
use tiercache_core::{Change, Changes, StorageKey, Value, WeakTieredCache};

use super::wire::{Notice, decode_message};
use super::{ALIVE_CHECK_EVERY, HEALTH_CHECK_EVERY, Inner, RESUBSCRIBE_BACKOFF};

/// The subscriber: (re)subscribes, flushes the local tiers each time it does (messages sent
/// before were not heard), applies messages, and checks the subscription. Ends when the chain
/// or the backplane is dropped, without waiting for a message.
pub(super) async fn listen<K: StorageKey, V: Value + DeserializeOwned>(
    backplane: Weak<Inner>,
    chain: WeakTieredCache<K, V>,
) {
    let mut first = true;
    let mut failures = 0u32;
    loop {
        let Some(inner) = backplane.upgrade() else {
            return;
        };
        if chain.upgrade().is_none() {
            return;
        }
        let servers = inner.clients.len();
        let server = inner.subscribe_to.load(Ordering::Relaxed) % servers;
        let connected = tokio::time::timeout(inner.connect_timeout, async {
            let mut pubsub = inner.clients[server].get_async_pubsub().await?;
            pubsub.subscribe(&inner.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            _ => {
                if !inner.tried.swap(true, Ordering::AcqRel) {
                    inner.tried_once.notify_waiters();
                }
                // Try the next server; wait once every server has failed.
                inner
                    .subscribe_to
                    .store((server + 1) % servers, Ordering::Relaxed);
                drop(inner);
                if server + 1 < servers {
                    continue;
                }
                failures += 1;
                tokio::time::sleep(resubscribe_backoff(failures)).await;
                continue;
            }
        };
        failures = 0;
        inner.subscribed.store(true, Ordering::Relaxed);
        {
            // Messages sent while there was no subscription (before the first one too, while
            // reads filled the memory tier) were not heard.
            if !first {
                inner.gaps.incr();
            }
            let Some(chain) = chain.upgrade() else { return };
            chain.flush_local().await;
        }
        first = false;
        if !inner.tried.swap(true, Ordering::AcqRel) {
            inner.tried_once.notify_waiters();
        }
        let (sink, mut stream) = pubsub.split();
        // The health check pings from its own task and says when the subscription is dead.
        let (dead, mut died) = tokio::sync::oneshot::channel::<()>();
        let checker = AbortOnDrop(tokio::spawn(health_check(
            sink,
            inner.timeout.max(Duration::from_millis(200)),
            dead,
        )));
        let instance = inner.instance;
        // Only a weak handle while waiting: dropping the backplane's last user ends this task.
        let received = Weak::clone(&backplane);
        drop(inner);
        let mut alive = tokio::time::interval(ALIVE_CHECK_EVERY);
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                _ = &mut died => None,
                _ = alive.tick() => {
                    if chain.upgrade().is_none() || received.upgrade().is_none() {
                        return;
                    }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let Some((sender, notice)) = std::str::from_utf8(message.get_payload_bytes())
                .ok()
                .and_then(decode_message)
            else {
                tracing::debug!("backplane message not understood; ignored");
                continue;
            };
            if sender == instance {
                continue;
            }
            let (Some(chain), Some(inner)) = (chain.upgrade(), received.upgrade()) else {
                return;
            };
            match notice {
                Notice::Flush => chain.flush_local().await,
                Notice::Key(text, version, json) => {
                    // A value that does not decode only costs the shortcut: evict.
                    let value = json
                        .and_then(|j| serde_json::from_str::<V>(&j).ok())
                        .map(Arc::new);
                    if let Some(key) = K::from_storage_key(&text) {
                        let change = Change::announced(key, version, value);
                        chain.apply(Changes::from_backplane(vec![change])).await;
                    }
                }
            }
            // Counted once applied: whoever sees the count sees the change.
            inner.received.incr();
        }
        drop(checker);
        let Some(inner) = backplane.upgrade() else {
            return;
        };
        inner.subscribed.store(false, Ordering::Relaxed);
        tracing::warn!(server, "backplane subscription lost");
    }
}

/// The wait before resubscribing after `failures` failed attempts in a row: doubling from the
/// first, capped, with up to half off at random so that instances do not reconnect in step.
fn resubscribe_backoff(failures: u32) -> Duration {
    let (first, longest) = RESUBSCRIBE_BACKOFF;
    tiercache_core::util::jittered_backoff(first, longest, failures)
}

/// PINGs the subscription every [`HEALTH_CHECK_EVERY`]; reports it dead when a PING fails or
/// does not answer within `limit`.
async fn health_check(
    mut sink: redis::aio::PubSubSink,
    limit: Duration,
    dead: tokio::sync::oneshot::Sender<()>,
) {
    let mut every = tokio::time::interval(HEALTH_CHECK_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let alive = tokio::time::timeout(limit, sink.ping::<redis::Value>()).await;
        if !matches!(alive, Ok(Ok(_))) {
            tracing::warn!("backplane subscription unresponsive; reconnecting");
            let _ = dead.send(());
            return;
        }
    }
}
