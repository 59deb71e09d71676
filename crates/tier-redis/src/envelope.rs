//! The bytes stored under a Redis key: a 12-byte header and the payload.
//!
//! ```text
//! 0     2        3       4      12
//! | "TC" | format | flags | version (u64, big-endian) | payload ...
//! ```
//!
//! * format: [`FORMAT`] (1). Another value is refused, so a future format is never misread.
//! * flags: bit 0 tombstone, bit 1 absent (a cached "not found"), bit 2 payload compressed with
//!   lz4 (size-prepended block). Other bits must be zero.
//! * payload: the value as JSON (none for tombstones and absent entries).
//!
//! The Lua scripts read the version and the tombstone bit from the header, so the layout of the
//! first 12 bytes is fixed for format 1.

use std::fmt;

/// The format version written and accepted.
pub const FORMAT: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted when decompressing (a corrupt size prefix must not allocate more).
pub const MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

const MAGIC: [u8; 2] = *b"TC";
const TOMBSTONE: u8 = 0b001;
const ABSENT: u8 = 0b010;
const COMPRESSED: u8 = 0b100;

/// What a stored value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A value at `version`, its payload (JSON, decompressed).
    Value {
        /// The source version.
        version: u64,
        /// The serialized value.
        payload: Vec<u8>,
    },
    /// A cached "not found" at `version`.
    Absent {
        /// The source version (0: never written).
        version: u64,
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
    #[error("truncated: {0} bytes, a header needs 12")]
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

/// Encodes a value at `version`, compressing payloads longer than `compress_above` bytes.
#[must_use]
pub fn encode_value(version: u64, payload: &[u8], compress_above: Option<usize>) -> Vec<u8> {
    let compress = compress_above.is_some_and(|limit| payload.len() > limit);
    let body = if compress {
        lz4_flex::compress_prepend_size(payload)
    } else {
        payload.to_vec()
    };
    let mut out = header(if compress { COMPRESSED } else { 0 }, version);
    out.extend_from_slice(&body);
    out
}

/// Encodes a cached "not found" at `version`.
#[must_use]
pub fn encode_absent(version: u64) -> Vec<u8> {
    header(ABSENT, version)
}

/// Encodes a tombstone at `version` (the Lua scripts write these themselves; this is for tests
/// and tools).
#[must_use]
pub fn encode_tombstone(version: u64) -> Vec<u8> {
    header(TOMBSTONE, version)
}

fn header(flags: u8, version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(flags);
    out.extend_from_slice(&version.to_be_bytes());
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
    let mut version = [0u8; 8];
    version.copy_from_slice(&bytes[4..HEADER_LEN]);
    let version = u64::from_be_bytes(version);
    let body = &bytes[HEADER_LEN..];
    match flags {
        TOMBSTONE | ABSENT if !body.is_empty() => Err(DecodeError::UnexpectedPayload),
        TOMBSTONE => Ok(Stored::Tombstone { version }),
        ABSENT => Ok(Stored::Absent { version }),
        0 => Ok(Stored::Value {
            version,
            payload: body.to_vec(),
        }),
        COMPRESSED => {
            if body.len() < 4 {
                return Err(DecodeError::Decompress("missing size".into()));
            }
            let size = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
            if size > MAX_DECOMPRESSED {
                return Err(DecodeError::Decompress(format!("claims {size} bytes")));
            }
            let payload = lz4_flex::decompress_size_prepended(body)
                .map_err(|e| DecodeError::Decompress(e.to_string()))?;
            Ok(Stored::Value { version, payload })
        }
        other => Err(DecodeError::BadFlags(other)),
    }
}

impl fmt::Display for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the payload: it may be a user's configuration.
        match self {
            Stored::Value { version, payload } => {
                write!(f, "value v{version} ({} bytes)", payload.len())
            }
            Stored::Absent { version } => write!(f, "absent v{version}"),
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
        let small = encode_value(7, b"{\"a\":1}", Some(1024));
        assert_eq!(
            decode(&small).unwrap(),
            Stored::Value {
                version: 7,
                payload: b"{\"a\":1}".to_vec()
            }
        );
        let big_payload = "x".repeat(10_000).into_bytes();
        let big = encode_value(9, &big_payload, Some(1024));
        assert!(big.len() < 1_000, "compressed: {}", big.len());
        assert_eq!(big[3], COMPRESSED);
        assert_eq!(
            decode(&big).unwrap(),
            Stored::Value {
                version: 9,
                payload: big_payload
            }
        );
        assert_eq!(
            decode(&encode_absent(0)).unwrap(),
            Stored::Absent { version: 0 }
        );
        assert_eq!(
            decode(&encode_tombstone(u64::MAX)).unwrap(),
            Stored::Tombstone { version: u64::MAX }
        );
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        assert_eq!(decode(b"TC"), Err(DecodeError::Truncated(2)));
        assert_eq!(
            decode(b"XX\x01\x00\0\0\0\0\0\0\0\x01"),
            Err(DecodeError::BadMagic)
        );
        let mut future = encode_value(1, b"{}", None);
        future[2] = 2;
        assert_eq!(decode(&future), Err(DecodeError::UnknownFormat(2)));
        let mut flags = encode_value(1, b"{}", None);
        flags[3] = 0b1000;
        assert_eq!(decode(&flags), Err(DecodeError::BadFlags(0b1000)));
        let mut stone = encode_tombstone(1);
        stone.push(b'x');
        assert_eq!(decode(&stone), Err(DecodeError::UnexpectedPayload));
        let mut bomb = header(COMPRESSED, 1);
        bomb.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bomb), Err(DecodeError::Decompress(_))));
        let mut truncated = encode_value(1, &"y".repeat(5000).into_bytes(), Some(10));
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
            let mut bytes = header(flags, 1);
            bytes.extend_from_slice(&body);
            let _ = decode(&bytes);
        }

        #[test]
        fn values_round_trip(version in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let bytes = encode_value(version, &payload, Some(100));
            prop_assert_eq!(decode(&bytes).unwrap(), Stored::Value { version, payload });
        }
    }
}
