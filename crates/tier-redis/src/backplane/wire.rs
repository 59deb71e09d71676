//! The backplane's wire format (UTF-8): `tc1 <instance id, hex> <version | - | *>
//! <percent-encoded key> [<value as JSON>]`, where `-` is a manual invalidation and `*` (with an
//! empty key) asks every instance to flush.

use tiercache_core::Version;

use crate::keys::{decode_key, encode_key};

/// What a message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Notice {
    /// Drop copies of the key older than the version (`None`: whatever is held), or replace a
    /// held copy with the value (JSON) at that version.
    Key(String, Option<Version>, Option<String>),
    /// Drop everything (the sender lost messages).
    Flush,
}

pub(super) fn encode_message(instance: u64, notice: &Notice) -> String {
    match notice {
        Notice::Key(key, version, value) => {
            let version = version.map_or_else(|| "-".to_owned(), |v| v.to_string());
            let mut text = format!("tc1 {instance:x} {version} {}", encode_key(key));
            if let Some(json) = value {
                text.push(' ');
                text.push_str(json);
            }
            text
        }
        Notice::Flush => format!("tc1 {instance:x} * "),
    }
}

pub(super) fn decode_message(text: &str) -> Option<(u64, Notice)> {
    let mut parts = text.splitn(5, ' ');
    if parts.next()? != "tc1" {
        return None;
    }
    let instance = u64::from_str_radix(parts.next()?, 16).ok()?;
    let version = parts.next()?;
    let key = parts.next()?;
    let value = parts.next().map(str::to_owned);
    let notice = match version {
        "*" => Notice::Flush,
        "-" => Notice::Key(decode_key(key)?, None, None),
        v => Notice::Key(decode_key(key)?, Some(v.parse().ok()?), value),
    };
    Some((instance, notice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for notice in [
            Notice::Key("a b:c".into(), Some(42), None),
            Notice::Key("k".into(), Some(7), Some("{\"a\": \"x y z\"}".into())),
            Notice::Key("ünï".into(), None, None),
            Notice::Key(String::new(), Some(1), None),
            Notice::Flush,
        ] {
            let text = encode_message(0xabc, &notice);
            assert_eq!(decode_message(&text), Some((0xabc, notice)), "{text}");
        }
        assert_eq!(decode_message("tc2 1 2 x"), None);
        assert_eq!(decode_message("tc1 zz 2 x"), None);
        assert_eq!(decode_message("tc1 1 two x"), None);
        assert_eq!(decode_message("tc1 1 2 a:b"), None, "not an encoded key");
    }
}
