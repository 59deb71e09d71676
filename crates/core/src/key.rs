//! [`StorageKey`]: how a key is written outside the process (a Redis key, a database column).

use std::borrow::Cow;
use std::sync::Arc;

use crate::tier::Key;

/// A key that tiers outside the process can store: it turns into text, one-to-one (two
/// different keys never give the same text).
///
/// Tiers escape the text as their store needs (the Redis tier percent-encodes it behind its
/// prefix); a key type only has to be injective.
///
/// ```
/// use tiercache_core::StorageKey;
/// assert_eq!("alice".to_string().storage_key(), "alice");
/// assert_eq!(42u64.storage_key(), "42");
/// ```
pub trait StorageKey: Key {
    /// The key as text.
    fn storage_key(&self) -> Cow<'_, str>;
}

impl StorageKey for String {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl StorageKey for Arc<str> {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl StorageKey for Box<str> {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl StorageKey for &'static str {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

macro_rules! integer_keys {
    ($($t:ty),*) => {$(
        impl StorageKey for $t {
            fn storage_key(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}

integer_keys!(
    u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize
);
