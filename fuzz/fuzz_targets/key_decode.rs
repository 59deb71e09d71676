//! Arbitrary text into the Redis key decoder: it must never panic, and a decoded key must
//! encode back to exactly the text it came from (the encoding is one-to-one).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_redis::{decode_key, encode_key};

fuzz_target!(|text: &str| {
    if let Some(key) = decode_key(text) {
        assert_eq!(encode_key(&key), text);
    }
    let encoded = encode_key(text);
    assert_eq!(decode_key(&encoded).as_deref(), Some(text));
});
