//! The server's errors as the core's kinds, by SQLSTATE (named constants, not bare strings).

use std::time::Duration;

use tiercache_core::Error;

/// SQLSTATE `query_canceled`: `statement_timeout` ran out.
pub(crate) const QUERY_CANCELED: &str = "57014";
/// SQLSTATE `read_only_sql_transaction`: a standby in recovery (or a read-only transaction)
/// refused a write, a `LISTEN`.
pub(crate) const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// SQLSTATE `too_many_connections`.
pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATEs of the server ending a session: `admin_shutdown`, `crash_shutdown`,
/// `cannot_connect_now`.
pub(crate) const SESSION_ENDED: [&str; 3] = ["57P01", "57P02", "57P03"];
/// SQLSTATE class `connection_exception`.
pub(crate) const CONNECTION_EXCEPTION_CLASS: &str = "08";

/// The write or delete function answered with an outcome this version does not know (the
/// migrations and the code disagree).
#[derive(Debug, thiserror::Error)]
#[error("the database's write function reported `{0}`, which this version does not know")]
pub(crate) struct UnexpectedReport(pub(crate) String);

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoConnection {
    #[error("the database refused or dropped the connection: {0}")]
    Unreachable(String),
    #[error("no pooled connection became free in time (the pool is busy)")]
    PoolBusy,
}

/// Maps a sqlx error onto the core's; a cancelled statement ran out of `statement_timeout`.
pub(crate) fn map_error(tier: &str, statement_timeout: Duration, error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => {
            Error::unavailable(tier, error)
        }
        sqlx::Error::PoolTimedOut => Error::unavailable(tier, NoConnection::PoolBusy),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(QUERY_CANCELED) => Error::Timeout {
                tier: tier.to_owned(),
                after: statement_timeout,
            },
            Some(READ_ONLY_SQL_TRANSACTION) => Error::read_only(tier, error),
            Some(code)
                if code.starts_with(CONNECTION_EXCEPTION_CLASS)
                    || SESSION_ENDED.contains(&code)
                    || code == TOO_MANY_CONNECTIONS =>
            {
                Error::unavailable(tier, error)
            }
            _ => Error::backend(tier, error),
        },
        _ => Error::backend(tier, error),
    }
}

/// Whether `error` says the connection it ran on is dead (not that the server refuses new
/// ones): I/O failures, and the server ending the session (SQLSTATE class 08, 57P01-57P03).
pub(crate) fn broken_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with(CONNECTION_EXCEPTION_CLASS) || SESSION_ENDED.contains(&&*code)
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_error("pg", Duration::from_secs(2), sqlx::Error::Io(refused)),
            Error::Unavailable { .. }
        ));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(map_error("pg", Duration::from_secs(2), sqlx::Error::Io(reset)).is_transient());
        assert!(map_error("pg", Duration::from_secs(2), sqlx::Error::PoolTimedOut).is_transient());
        let other = map_error("pg", Duration::from_secs(2), sqlx::Error::RowNotFound);
        assert!(matches!(other, Error::Backend { .. }) && !other.is_transient());
    }
}
