//! The userconfig crate's error type.

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong serving user configurations.
///
/// Input errors ([`Error::InvalidUserId`], [`Error::ConfigTooLarge`], [`Error::InvalidConfig`])
/// are raised before any I/O. Messages never contain a configuration value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The user id is empty, too long, or holds control characters.
    #[error("invalid user id: {reason}")]
    InvalidUserId {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The serialized configuration is over the size limit.
    #[error("configuration is {size} bytes serialized; the limit is {limit}")]
    ConfigTooLarge {
        /// Its serialized size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The configuration breaks a rule of the schema (the message names the field).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A conditional update ([`update_user_config_if`](crate::UserConfigStorage::update_user_config_if))
    /// found the user's configuration at another version than expected: someone changed it
    /// since it was read. Nothing was written.
    #[error("the configuration is at version {current}, not the expected {expected}")]
    Conflict {
        /// The version the update expected (0: no stored configuration).
        expected: tiercache_core::Version,
        /// The stored version when the update was refused (0: none is stored).
        current: tiercache_core::Version,
    },
    /// [`modify_user_config`](crate::UserConfigStorage::modify_user_config) lost the race to
    /// other writers this many times in a row and gave up. Nothing was written.
    #[error("gave up after {attempts} conflicting attempts to modify the configuration")]
    TooManyConflicts {
        /// Attempts made.
        attempts: u32,
    },
    /// [`watch`](crate::UserConfigStorage::watch) of one more user than the storage's cap
    /// ([`max_watched_users`](crate::UserConfigStorageBuilder::max_watched_users)).
    #[error("{limit} users are watched already, the most this storage watches")]
    TooManyWatches {
        /// The cap.
        limit: usize,
    },
    /// A version of the user's configuration the database does not keep: never this user's,
    /// or older than the history's retention.
    #[error("version {version} of this configuration is not kept")]
    VersionNotKept {
        /// The version asked for.
        version: tiercache_core::Version,
    },
    /// A change-log cursor ([`changes`](crate::UserConfigStorage::changes)) this instance can
    /// no longer resume from: another instance's, one from before a restart, or older than
    /// what the log keeps. Read every user you keep again, then follow from now.
    #[error("this cursor can no longer be resumed from: re-sync, then follow from now")]
    CursorTooOld,
    /// The storage was configured wrongly (a bad URL, a zero capacity).
    #[error("invalid storage settings: {0}")]
    Settings(String),
    /// A cache tier or the database failed (see [`tiercache_core::Error`]).
    #[error(transparent)]
    Cache(tiercache_core::Error),
}

impl From<tiercache_core::Error> for Error {
    fn from(error: tiercache_core::Error) -> Self {
        match error {
            tiercache_core::Error::Conflict {
                expected, current, ..
            } => Error::Conflict { expected, current },
            other => Error::Cache(other),
        }
    }
}

impl Error {
    /// Whether retrying later may succeed (the database or a cache was unreachable or slow).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Cache(e) if e.is_transient())
    }

    /// Whether a write's outcome is unknown: it timed out, or lost its connection after it was
    /// sent, so the database may have committed it. The key was invalidated in every cache
    /// either way; read it back to know.
    #[must_use]
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Cache(e) if e.outcome_unknown())
    }

    /// Whether the caller's input was rejected before any I/O.
    #[must_use]
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidUserId { .. } | Error::ConfigTooLarge { .. } | Error::InvalidConfig(_)
        )
    }

    /// For a refused conditional update: the stored version when it was refused.
    #[must_use]
    pub fn conflict(&self) -> Option<tiercache_core::Version> {
        match self {
            Error::Conflict { current, .. } => Some(*current),
            _ => None,
        }
    }

    /// Whether the database only reads (a standby in recovery, or read-only): writes will not
    /// work until it points at the primary.
    #[must_use]
    pub fn is_read_only(&self) -> bool {
        matches!(self, Error::Cache(e) if e.is_read_only())
    }

    /// Whether stored data for the user could not be decoded (it is never replaced by
    /// defaults: a later update would destroy the user's data).
    #[must_use]
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Cache(e) if e.is_corrupt())
    }
}
