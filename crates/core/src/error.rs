//! The one error type of the core crate, shared by every tier.

use std::sync::Arc;
use std::time::Duration;

use crate::entry::Version;

/// A boxed error from a tier's backend, shared so that [`Error`] is cheap to clone (callers
/// coalesced on one load all receive the same error).
pub type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a tier or in the chain.
///
/// Tiers map their backend's failures onto these variants; the chain uses the classification
/// methods ([`Error::is_transient`], [`Error::is_timeout`]) to decide what to do. Messages never
/// contain a cached value or a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A call to a tier did not finish within its time limit.
    #[error("tier `{tier}` timed out after {after:?}")]
    Timeout {
        /// The tier's name.
        tier: String,
        /// The time limit that passed.
        after: Duration,
    },
    /// A tier's backend could not be reached (connection refused or dropped, pool exhausted,
    /// server restarting). Worth retrying later.
    #[error("tier `{tier}` is unavailable")]
    Unavailable {
        /// The tier's name.
        tier: String,
        /// What the backend said.
        #[source]
        source: BoxError,
    },
    /// The call reached the backend but its answer was lost (the connection dropped half way):
    /// it may have taken effect. Worth retrying later; for a write, see
    /// [`Error::outcome_unknown`].
    #[error("tier `{tier}` lost its connection during the call")]
    Interrupted {
        /// The tier's name.
        tier: String,
        /// What the backend said.
        #[source]
        source: BoxError,
    },
    /// The tier's circuit breaker is open: it failed repeatedly and is skipped until a probe
    /// succeeds.
    #[error("tier `{tier}` is skipped: its circuit breaker is open")]
    CircuitOpen {
        /// The tier's name.
        tier: String,
    },
    /// A tier's backend refused or failed the call for a reason retrying will not fix.
    #[error("tier `{tier}` failed")]
    Backend {
        /// The tier's name.
        tier: String,
        /// What the backend said.
        #[source]
        source: BoxError,
    },
    /// The source only reads: it is a server in recovery (a standby) or read-only by
    /// configuration. Writing there will not work until it is promoted or the source points at
    /// the primary: a configuration to fix, not a fault to retry.
    #[error("tier `{tier}` only reads (a standby, or read-only): point it at the primary")]
    ReadOnly {
        /// The tier's name.
        tier: String,
        /// What the server said.
        #[source]
        source: BoxError,
    },
    /// Stored bytes for a key could not be decoded.
    #[error("tier `{tier}` holds data it cannot decode")]
    Corrupt {
        /// The tier's name.
        tier: String,
        /// Why decoding failed.
        #[source]
        source: BoxError,
    },
    /// The tier does not support this operation (for example `write` on a cache tier).
    #[error("tier `{tier}` does not support `{operation}`")]
    Unsupported {
        /// The tier's name.
        tier: String,
        /// The operation.
        operation: &'static str,
    },
    /// A conditional write ([`Source::write`](crate::Source::write) with an expected version)
    /// found the key at another version: someone else wrote it since it was read. Read it
    /// again (from the source) and retry.
    #[error("tier `{tier}` holds version {current} of the key, not the expected {expected}")]
    Conflict {
        /// The tier's name.
        tier: String,
        /// The version the write expected (0: that nothing was stored).
        expected: Version,
        /// The version stored when the write was refused (0: nothing is stored).
        current: Version,
    },
    /// A configuration value was rejected when the tier or chain was built.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A value or key was rejected before any I/O.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The source failed to load a key and no cached copy was fresh or within the max-stale age.
    #[error("source unavailable and no usable cached copy")]
    SourceUnavailable {
        /// Why the source failed.
        #[source]
        source: Box<Error>,
    },
    /// Background work could not finish in the time given
    /// ([`TieredCache::flush`](crate::TieredCache::flush)): a tier that still misses
    /// invalidations, or messages the backplane could not send.
    #[error("`{tier}` could not be reached: {pending} {what} left undone")]
    Unfinished {
        /// The tier (or `backplane`, or `chain` for work in flight) that is behind.
        tier: String,
        /// What is left: "invalidations", "messages", "tasks".
        what: &'static str,
        /// How many.
        pending: u64,
    },
}

impl Error {
    /// Wraps a backend error that retrying may fix.
    pub fn unavailable(
        tier: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Unavailable {
            tier: tier.into(),
            source: Arc::new(source),
        }
    }

    /// Wraps the failure of a call that reached the backend and lost its answer.
    pub fn interrupted(
        tier: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Interrupted {
            tier: tier.into(),
            source: Arc::new(source),
        }
    }

    /// Wraps a backend error that retrying will not fix.
    pub fn backend(
        tier: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Backend {
            tier: tier.into(),
            source: Arc::new(source),
        }
    }

    /// Wraps a decoding failure.
    pub fn corrupt(
        tier: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Corrupt {
            tier: tier.into(),
            source: Arc::new(source),
        }
    }

    /// Wraps the refusal of a server that only reads.
    pub fn read_only(
        tier: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::ReadOnly {
            tier: tier.into(),
            source: Arc::new(source),
        }
    }

    /// The error a tier returns for an operation it does not have.
    pub fn unsupported(tier: impl Into<String>, operation: &'static str) -> Self {
        Error::Unsupported {
            tier: tier.into(),
            operation,
        }
    }

    /// Whether retrying the same call later may succeed (timeouts, unreachable backends).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. }
            | Error::Unavailable { .. }
            | Error::Interrupted { .. }
            | Error::CircuitOpen { .. } => true,
            Error::SourceUnavailable { source } => source.is_transient(),
            _ => false,
        }
    }

    /// For a failed write: whether it may have happened all the same. A call that timed out or
    /// lost its connection half way ([`Error::Interrupted`]) may have committed; one that
    /// could not reach the backend, that the chain skipped (an open breaker) or that the
    /// backend refused did not.
    #[must_use]
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Interrupted { .. })
    }

    /// Whether the call ran out of time.
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::SourceUnavailable { source } => source.is_timeout(),
            _ => false,
        }
    }

    /// For a refused conditional write: the version stored when it was refused.
    #[must_use]
    pub fn conflict(&self) -> Option<Version> {
        match self {
            Error::Conflict { current, .. } => Some(*current),
            _ => None,
        }
    }

    /// Whether the source only reads (a standby): a write will not work there.
    #[must_use]
    pub fn is_read_only(&self) -> bool {
        matches!(self, Error::ReadOnly { .. })
    }

    /// Whether stored data could not be decoded.
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// Whether the caller's input or configuration was rejected (before any I/O).
    #[must_use]
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidInput(_) | Error::Config(_))
    }

    /// The name of the tier the error came from, if it came from one.
    #[must_use]
    pub fn tier(&self) -> Option<&str> {
        match self {
            Error::Timeout { tier, .. }
            | Error::Unavailable { tier, .. }
            | Error::Interrupted { tier, .. }
            | Error::Backend { tier, .. }
            | Error::ReadOnly { tier, .. }
            | Error::Corrupt { tier, .. }
            | Error::CircuitOpen { tier }
            | Error::Conflict { tier, .. }
            | Error::Unsupported { tier, .. }
            | Error::Unfinished { tier, .. } => Some(tier),
            Error::SourceUnavailable { source } => source.tier(),
            Error::Config(_) | Error::InvalidInput(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let down = Error::unavailable("redis", io);
        assert!(down.is_transient());
        assert!(!down.is_timeout());
        assert_eq!(down.tier(), Some("redis"));

        let slow = Error::Timeout {
            tier: "postgres".into(),
            after: Duration::from_millis(50),
        };
        assert!(slow.is_transient() && slow.is_timeout());
        assert!(slow.outcome_unknown() && !down.outcome_unknown());
        let cut = Error::interrupted("db", std::fmt::Error);
        assert!(cut.outcome_unknown() && cut.is_transient());
        assert!(!Error::CircuitOpen { tier: "db".into() }.outcome_unknown());
        assert!(!Error::backend("db", std::fmt::Error).outcome_unknown());

        let wrapped = Error::SourceUnavailable {
            source: Box::new(slow.clone()),
        };
        assert!(wrapped.is_transient() && wrapped.is_timeout());
        assert_eq!(wrapped.tier(), Some("postgres"));

        assert!(!Error::unsupported("memory", "write").is_transient());
        assert!(Error::InvalidInput("empty key".into()).is_invalid_input());
        let moved = Error::Conflict {
            tier: "db".into(),
            expected: 3,
            current: 7,
        };
        assert_eq!(moved.conflict(), Some(7));
        assert!(!moved.is_transient() && !moved.outcome_unknown());
        assert_eq!(down.conflict(), None);
        let bad = Error::corrupt("redis", std::fmt::Error);
        assert!(bad.is_corrupt() && !bad.is_transient());
        let standby = Error::read_only("postgres", std::fmt::Error);
        assert!(standby.is_read_only() && !standby.is_transient() && !standby.outcome_unknown());
        assert_eq!(standby.tier(), Some("postgres"));
    }

    #[test]
    fn errors_are_cheap_to_share() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Error>();
    }
}
