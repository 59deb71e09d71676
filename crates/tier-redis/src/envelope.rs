//! The bytes stored under a Redis key: a 20-byte header and the payload.
//!
//! ```text
//! 0      2        3       4                            12                              20
//! | "TC" | format | flags | version (u64, big-endian) | expiry (u64 BE, Unix ms, 0: none) | payload
//! ```
//!
//! * format: [`FORMAT`] (2). Another value is refused (and the entry treated as corrupt), so a
//!   future or past format is never misread.
//! * expiry: when the entry expires, in milliseconds since the Unix epoch, so that a read needs
//!   no second command (PTTL) to know the remaining time to live. It is written with the same
//!   time to live Redis is given; instances' clocks are assumed synchronized (NTP) to well
//!   under the TTL, and a skew only shifts how long a back-filled copy lives above.
//! * flags: bit 0 tombstone, bit 1 absent (a cached "not found"), bit 2 payload compressed with
//!   lz4 (size-prepended block), bit 3 payload in MessagePack (else JSON). Other bits must be
//!   zero.
//! * payload: the value, MessagePack (with field names, so unknown fields survive) or JSON
//!   (none for tombstones and absent entries).
//!
//! The Lua scripts read the version and the tombstone bit from the header, so the layout of the
//! header is fixed for format 2.

use std::fmt;

/// The format version written and accepted.
pub const FORMAT: u8 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted when decompressing (a corrupt size prefix must not allocate more).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

const MAGIC: [u8; 2] = *b"TC";
const TOMBSTONE: u8 = 0b001;
const ABSENT: u8 = 0b010;
const COMPRESSED: u8 = 0b100;
const MSGPACK: u8 = 0b1000;

/// How a value's payload is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// MessagePack with field names: smaller and faster than JSON (benches/tiers.rs).
    #[default]
    MessagePack,
    /// JSON: readable with `redis-cli`.
    Json,
}

/// What a stored value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A value at `version`, its payload (decompressed) and how it is serialized.
    Value {
        /// The source version.
        version: u64,
        /// When it expires, in Unix milliseconds (0: not recorded).
        expires_unix_ms: u64,
        /// The serialized value.
        payload: Vec<u8>,
        /// Its serialization.
        codec: Codec,
    },
    /// A cached "not found" at `version`.
    Absent {
        /// The source version (0: never written).
        version: u64,
        /// When it expires, in Unix milliseconds (0: not recorded).
        expires_unix_ms: u64,
    },
    /// An invalidation refusing versions `<= version`.
    Tombstone {
        /// The invalidated version.
        version: u64,
    },
}

/// Why stored bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("truncated: {0} bytes, a header needs 20")]
    Truncated(usize),
    /// The bytes do not start with "TC".
    #[error("not a tiercache envelope")]
    BadMagic,
    /// A format this version does not read.
    #[error("unknown envelope format {0}")]
    UnknownFormat(u8),
    /// Flags that make no sense together, or unknown flag bits.
    #[error("invalid flags {0:#04x}")]
    BadFlags(u8),
    /// A tombstone or absent entry with a payload.
    #[error("unexpected payload")]
    UnexpectedPayload,
    /// The compressed payload does not decompress.
    #[error("payload does not decompress: {0}")]
    Decompress(String),
}

/// Encodes a value at `version` whose payload was serialized with `codec`, compressing payloads
/// longer than `compress_above` bytes.
#[must_use]
pub fn encode_value(
    version: u64,
    expires_unix_ms: u64,
    payload: &[u8],
    codec: Codec,
    compress_above: Option<usize>,
) -> Vec<u8> {
    let compress = compress_above.is_some_and(|limit| payload.len() > limit);
    let body = if compress {
        lz4_flex::compress_prepend_size(payload)
    } else {
        payload.to_vec()
    };
    let mut flags = if compress { COMPRESSED } else { 0 };
    if codec == Codec::MessagePack {
        flags |= MSGPACK;
    }
    let mut out = header(flags, version, expires_unix_ms);
    out.extend_from_slice(&body);
    out
}

/// Encodes a cached "not found" at `version`.
#[must_use]
pub fn encode_absent(version: u64, expires_unix_ms: u64) -> Vec<u8> {
    header(ABSENT, version, expires_unix_ms)
}

/// Encodes a tombstone at `version` (the Lua scripts write these themselves; this is for tests
/// and tools).
#[must_use]
pub fn encode_tombstone(version: u64) -> Vec<u8> {
    header(TOMBSTONE, version, 0)
}

fn header(flags: u8, version: u64, expires_unix_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(flags);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&expires_unix_ms.to_be_bytes());
    out
}

/// Decodes stored bytes. Never panics, whatever the input.
pub fn decode(bytes: &[u8]) -> Result<Stored, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[2] != FORMAT {
        return Err(DecodeError::UnknownFormat(bytes[2]));
    }
    let flags = bytes[3];
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let (version, expires_unix_ms) = (word(4), word(12));
    let body = &bytes[HEADER_LEN..];
    match flags {
        TOMBSTONE | ABSENT if !body.is_empty() => Err(DecodeError::UnexpectedPayload),
        TOMBSTONE => Ok(Stored::Tombstone { version }),
        ABSENT => Ok(Stored::Absent {
            version,
            expires_unix_ms,
        }),
        f if f & !(COMPRESSED | MSGPACK) == 0 => {
            let codec = if f & MSGPACK == 0 {
                Codec::Json
            } else {
                Codec::MessagePack
            };
            let payload = if f & COMPRESSED == 0 {
                body.to_vec()
            } else {
                if body.len() < 4 {
                    return Err(DecodeError::Decompress("missing size".into()));
                }
                let size = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                if size > MAX_DECOMPRESSED {
                    return Err(DecodeError::Decompress(format!("claims {size} bytes")));
                }
                lz4_flex::decompress_size_prepended(body)
                    .map_err(|e| DecodeError::Decompress(e.to_string()))?
            };
            Ok(Stored::Value {
                version,
                expires_unix_ms,
                payload,
                codec,
            })
        }
        other => Err(DecodeError::BadFlags(other)),
    }
}

impl fmt::Display for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the payload: it may be a user's configuration.
        match self {
            Stored::Value {
                version,
                payload,
                codec,
                ..
            } => write!(f, "value v{version} ({} bytes, {codec:?})", payload.len()),
            Stored::Absent { version, .. } => write!(f, "absent v{version}"),
            Stored::Tombstone { version } => write!(f, "tombstone v{version}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let small = encode_value(7, 1_700_000_000_000, b"{\"a\":1}", Codec::Json, Some(1024));
        assert_eq!(
            decode(&small).unwrap(),
            Stored::Value {
                version: 7,
                expires_unix_ms: 1_700_000_000_000,
                payload: b"{\"a\":1}".to_vec(),
                codec: Codec::Json,
            }
        );
        let big_payload = "x".repeat(10_000).into_bytes();
        let big = encode_value(9, 5, &big_payload, Codec::MessagePack, Some(1024));
        assert!(big.len() < 1_000, "compressed: {}", big.len());
        assert_eq!(big[3], COMPRESSED | MSGPACK);
        assert_eq!(
            decode(&big).unwrap(),
            Stored::Value {
                version: 9,
                expires_unix_ms: 5,
                payload: big_payload,
                codec: Codec::MessagePack,
            }
        );
        assert_eq!(
            decode(&encode_absent(0, 9)).unwrap(),
            Stored::Absent {
                version: 0,
                expires_unix_ms: 9
            }
        );
        assert_eq!(
            decode(&encode_tombstone(u64::MAX)).unwrap(),
            Stored::Tombstone { version: u64::MAX }
        );
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        assert_eq!(decode(b"TC"), Err(DecodeError::Truncated(2)));
        assert_eq!(decode(&[b'X'; 20]), Err(DecodeError::BadMagic));
        assert_eq!(decode(&[b'T'; 12]), Err(DecodeError::Truncated(12)));
        let mut future = encode_value(1, 0, b"{}", Codec::Json, None);
        future[2] = 3;
        assert_eq!(decode(&future), Err(DecodeError::UnknownFormat(3)));
        future[2] = 1;
        assert_eq!(decode(&future), Err(DecodeError::UnknownFormat(1)));
        let mut flags = encode_value(1, 0, b"{}", Codec::Json, None);
        flags[3] = 0b1_0000;
        assert_eq!(decode(&flags), Err(DecodeError::BadFlags(0b1_0000)));
        let mut stone = encode_tombstone(1);
        stone.push(b'x');
        assert_eq!(decode(&stone), Err(DecodeError::UnexpectedPayload));
        let mut bomb = header(COMPRESSED, 1, 0);
        bomb.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bomb), Err(DecodeError::Decompress(_))));
        let mut truncated =
            encode_value(1, 0, &"y".repeat(5000).into_bytes(), Codec::Json, Some(10));
        truncated.truncate(truncated.len() - 3);
        assert!(decode(&truncated).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_behind_a_valid_header(
            flags in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = header(flags, 1, 0);
            bytes.extend_from_slice(&body);
            let _ = decode(&bytes);
        }

        #[test]
        fn values_round_trip(version in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let bytes = encode_value(version, version / 3, &payload, Codec::MessagePack, Some(100));
            prop_assert_eq!(
                decode(&bytes).unwrap(),
                Stored::Value { version, expires_unix_ms: version / 3, payload, codec: Codec::MessagePack }
            );
        }
    }
}
