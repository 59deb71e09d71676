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
/// assert_eq!(u64::from_storage_key("42"), Some(42));
/// assert_eq!(u64::from_storage_key("042"), None);
/// ```
pub trait StorageKey: Key {
    /// The key as text.
    fn storage_key(&self) -> Cow<'_, str>;

    /// The key whose text is `text`, if any (for messages between instances that name keys).
    fn from_storage_key(text: &str) -> Option<Self>;
}

impl StorageKey for String {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }

    fn from_storage_key(text: &str) -> Option<Self> {
        Some(text.to_owned())
    }
}

impl StorageKey for Arc<str> {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }

    fn from_storage_key(text: &str) -> Option<Self> {
        Some(Arc::from(text))
    }
}

impl StorageKey for Box<str> {
    fn storage_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }

    fn from_storage_key(text: &str) -> Option<Self> {
        Some(Box::from(text))
    }
}

macro_rules! integer_keys {
    ($($t:ty),*) => {$(
        impl StorageKey for $t {
            fn storage_key(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }

            fn from_storage_key(text: &str) -> Option<Self> {
                let parsed: $t = text.parse().ok()?;
                // Only the canonical text ("7", not "+7" or "07") names a key.
                (parsed.to_string() == text).then_some(parsed)
            }
        }
    )*};
}

integer_keys!(
    u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize, isize
);
