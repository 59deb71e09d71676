//! Payloads: a value serialized with the tier's codec (MessagePack or JSON), and errors that
//! say what failed without quoting the data.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::Codec;

/// Where and why JSON did not decode, without quoting the data (it may be a user's
/// configuration): "data error at line 1 column 31".
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "io",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "unexpected end",
    };
    format!("{kind} error at line {} column {}", e.line(), e.column())
}

/// `value` serialized with `codec`.
pub(crate) fn encode_payload<V: Serialize>(
    value: &V,
    codec: Codec,
) -> std::result::Result<Vec<u8>, String> {
    match codec {
        Codec::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
        Codec::Json => serde_json::to_vec(value).map_err(|e| json_error(&e)),
    }
}

/// A payload serialized with `codec`; the error says what failed, never the data.
pub(crate) fn decode_payload<V: DeserializeOwned>(
    payload: &[u8],
    codec: Codec,
) -> std::result::Result<V, String> {
    match codec {
        Codec::MessagePack => rmp_serde::from_slice(payload).map_err(|e| match e {
            rmp_serde::decode::Error::InvalidMarkerRead(_)
            | rmp_serde::decode::Error::InvalidDataRead(_) => "truncated MessagePack".to_owned(),
            rmp_serde::decode::Error::TypeMismatch(_) => "MessagePack type mismatch".to_owned(),
            rmp_serde::decode::Error::OutOfRange => "MessagePack number out of range".to_owned(),
            rmp_serde::decode::Error::LengthMismatch(_) => "MessagePack length mismatch".to_owned(),
            rmp_serde::decode::Error::Utf8Error(_) => "MessagePack string not UTF-8".to_owned(),
            // serde's custom messages may quote the data: say only that the shape is wrong.
            _ => "MessagePack data does not fit the value's type".to_owned(),
        }),
        Codec::Json => serde_json::from_slice(payload).map_err(|e| json_error(&e)),
    }
}
