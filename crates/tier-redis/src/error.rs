//! How the tier's failures read: a redis error mapped onto the core's (connection trouble and
//! timeouts are transient), and the tier's own reasons.

use std::time::Duration;

use redis::RedisError;
use tiercache_core::Error;

/// Maps a redis error onto the core's: timeouts and connection trouble are transient.
pub(crate) fn map_error(tier: &str, error: RedisError) -> Error {
    if error.is_timeout() {
        Error::Timeout {
            tier: tier.to_owned(),
            after: Duration::ZERO,
        }
    } else if error.is_io_error() || error.is_connection_refusal() || error.is_connection_dropped()
    {
        Error::unavailable(tier, error)
    } else {
        Error::backend(tier, error)
    }
}

/// Whether an error says the connection, not the command, failed.
pub(crate) fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}

/// A call made while the first connection is still being made.
#[derive(Debug, thiserror::Error)]
#[error("still connecting to Redis")]
pub(crate) struct Connecting;

/// A value that does not serialize.
#[derive(Debug, thiserror::Error)]
#[error("value does not serialize: {0}")]
pub(crate) struct Unserializable(pub(crate) String);

/// A stored payload that does not deserialize.
#[derive(Debug, thiserror::Error)]
#[error("stored value does not decode: {0}")]
pub(crate) struct Undecodable(pub(crate) String);
