//! Redis keys: the tier's prefix followed by the key's text, percent-encoded.
//!
//! Every byte outside `A-Z a-z 0-9 . _ ~ @ + = -` is written `%XX`, so the encoded part never
//! holds `:` or a glob character (`* ? [ ] \`). Percent-encoding is one-to-one, so two keys
//! never share a Redis key, and [`clear`](crate::RedisTier) can tell this tier's keys from those
//! of a tier whose prefix extends this one (`app:` and `app:x:`): only this tier's have no `:`
//! after the prefix.

/// Whether `b` is written as itself.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'@' | b'+' | b'=' | b'-')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The encoded form of `key`.
#[must_use]
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xF)] as char);
        }
    }
    out
}

/// The key `encoded` came from, if it is exactly what [`encode_key`] writes for some key.
#[must_use]
pub fn decode_key(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |c: u8| HEX.iter().position(|&h| h == c);
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            let decoded = (hi << 4 | lo) as u8;
            if is_plain(decoded) {
                return None; // not canonical: encode_key writes it plain
            }
            out.push(decoded);
            i += 3;
        } else if is_plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// `prefix` with glob characters escaped, for `SCAN ... MATCH`.
#[must_use]
pub fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(encode_key("alice"), "alice");
        assert_eq!(encode_key("a:b*c"), "a%3Ab%2Ac");
        assert_eq!(encode_key("100%"), "100%25");
        assert_eq!(encode_key("é"), "%C3%A9");
        assert_eq!(decode_key("a%3Ab%2Ac").as_deref(), Some("a:b*c"));
        assert_eq!(decode_key("%61"), None, "not canonical");
        assert_eq!(decode_key("a:b"), None);
        assert_eq!(decode_key("%4"), None);
        assert_eq!(glob_escape("app[1]*:"), "app\\[1\\]\\*:");
    }

    proptest! {
        #[test]
        fn encoding_is_one_to_one(a in any::<String>(), b in any::<String>()) {
            let (ea, eb) = (encode_key(&a), encode_key(&b));
            prop_assert_eq!(decode_key(&ea), Some(a.clone()));
            prop_assert_eq!(a == b, ea == eb);
            prop_assert!(!ea.contains(':') && !ea.contains('*') && !ea.contains('?'));
            prop_assert!(!ea.contains('[') && !ea.contains(']') && !ea.contains('\\'));
        }

        #[test]
        fn decoding_arbitrary_text_never_panics(s in any::<String>()) {
            if let Some(key) = decode_key(&s) {
                prop_assert_eq!(encode_key(&key), s);
            }
        }
    }
}
