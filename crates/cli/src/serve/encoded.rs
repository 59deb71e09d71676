//! The JSON of the configurations `GET` serves, kept while the chain's copy lives: encoding a
//! configuration (about 2 KiB) costs more than the rest of a memory hit through the service
//! together (`benches/http.rs`), and a cached copy never changes.
//!
//! An entry is the copy's address, held as a `Weak` (which keeps the allocation, so no other
//! value can take the address while the entry exists), and its bytes: a `GET` that fetched the
//! very same `Arc` reuses them, anything else (a newer version, another instance's fill, the
//! defaults of an unknown user) is encoded again.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use axum::body::Bytes;
use userconfig::UserConfig;

const SHARDS: usize = 16;

type Shard = HashMap<String, (Weak<UserConfig>, Bytes)>;

pub(crate) struct Encoded {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
}

impl Encoded {
    /// Keeps about `capacity` users' encodings (the memory tier's capacity).
    pub(crate) fn new(capacity: usize) -> Self {
        Encoded {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `config` (fetched for `user`) as JSON.
    pub(crate) fn get(&self, user: &str, config: &Arc<UserConfig>) -> Bytes {
        if let Some((copy, bytes)) = self.shard(user).get(user)
            && std::ptr::eq(copy.as_ptr(), Arc::as_ptr(config))
        {
            return bytes.clone();
        }
        let mut body = Vec::with_capacity(4096);
        serde_json::to_writer(&mut body, &**config).expect("configs serialize");
        let bytes = Bytes::from(body);
        let mut shard = self.shard(user);
        if shard.len() >= self.per_shard && !shard.contains_key(user) {
            // Any entry: the cost of a wrong choice is one encoding.
            if let Some(victim) = shard.keys().next().cloned() {
                shard.remove(&victim);
            }
        }
        shard.insert(user.to_owned(), (Arc::downgrade(config), bytes.clone()));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_copy_reuses_its_bytes_and_another_is_encoded_again() {
        let encoded = Encoded::new(2);
        let mut config = UserConfig::default_for("alice");
        config.preferences.theme = "dark".into();
        let first = Arc::new(config.clone());
        let a = encoded.get("alice", &first);
        let b = encoded.get("alice", &first);
        assert_eq!(a.as_ptr(), b.as_ptr(), "reused");
        // An equal address only for the same allocation: a new copy is encoded again.
        config.preferences.theme = "light".into();
        let second = Arc::new(config);
        let c = encoded.get("alice", &second);
        assert!(std::str::from_utf8(&c).unwrap().contains("light"));
        assert!(std::str::from_utf8(&a).unwrap().contains("dark"));
        // Bounded: many users keep at most about the capacity.
        for i in 0..100 {
            let user = format!("u{i}");
            encoded.get(&user, &Arc::new(UserConfig::default_for(&user)));
        }
        let kept: usize = encoded.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= SHARDS, "{kept}");
    }
}
