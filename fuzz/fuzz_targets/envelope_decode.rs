//! Arbitrary bytes into the Redis envelope decoder: it must never panic, and whatever decodes
//! must encode back to bytes that decode to the same thing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_redis::envelope::{self, Stored};

fuzz_target!(|data: &[u8]| {
    let Ok(stored) = envelope::decode(data) else {
        return;
    };
    let again = match &stored {
        Stored::Value {
            version,
            expires_unix_ms,
            payload,
            codec,
        } => envelope::encode_value(*version, *expires_unix_ms, payload, *codec, None),
        Stored::Absent {
            version,
            expires_unix_ms,
        } => envelope::encode_absent(*version, *expires_unix_ms),
        Stored::Tombstone { version } => envelope::encode_tombstone(*version),
    };
    assert_eq!(envelope::decode(&again).as_ref(), Ok(&stored));
    if let Stored::Value { payload, .. } = &stored {
        // The payload goes to serde_json next: that must not panic either.
        let _ = serde_json::from_slice::<serde_json::Value>(payload);
    }
});
