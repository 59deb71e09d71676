//! Why a command failed, and its exit code.
//!
//! | code | meaning |
//! |---:|---|
//! | 0 | done |
//! | 1 | any other failure |
//! | 2 | usage: a bad argument, option or setting (`DATABASE_URL`, …) |
//! | 3 | invalid input: a bad user id, configuration or JSON, refused before any I/O |
//! | 4 | not found: `get --require-stored` of a user with nothing stored |
//! | 5 | unavailable: the database or a cache could not be reached (a change the database took but a cache could not is stored, and named) |
//! | 6 | conflict: `set --if-version` or `delete --if-version` found another version (the stored one is named), or a change lost to other writers too often |

use std::fmt;
use std::process::ExitCode;

use serde_json::json;

pub(crate) const EXIT_OTHER: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_INVALID: u8 = 3;
pub(crate) const EXIT_NOT_FOUND: u8 = 4;
pub(crate) const EXIT_UNAVAILABLE: u8 = 5;
pub(crate) const EXIT_CONFLICT: u8 = 6;

/// A failure to report: its message (never a configuration value or a URL), kind and exit
/// code.
#[derive(Debug)]
pub(crate) struct Failure {
    message: String,
    kind: &'static str,
    code: u8,
    /// For a conflict: the stored version.
    current: Option<u64>,
}

impl Failure {
    fn with(kind: &'static str, code: u8, message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            kind,
            code,
            current: None,
        }
    }

    /// Any other failure (exit code 1).
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Failure::with("failed", EXIT_OTHER, message)
    }

    /// A bad argument or setting (exit code 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure::with("usage", EXIT_USAGE, message)
    }

    /// Input refused before any I/O (exit code 3).
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Failure::with("invalid_input", EXIT_INVALID, message)
    }

    /// Nothing stored where something must be (exit code 4).
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Failure::with("not_found", EXIT_NOT_FOUND, message)
    }

    /// Something could not be reached (exit code 5).
    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Failure::with("unavailable", EXIT_UNAVAILABLE, message)
    }

    pub(crate) fn code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }

    /// The failure as the JSON a `--json` command prints on standard output.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut error =
            json!({ "kind": self.kind, "message": self.message, "exit_code": self.code });
        if let Some(current) = self.current {
            error["current_version"] = json!(current);
        }
        json!({ "error": error })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// An error and its sources, as one line.
pub(crate) fn explain(e: &dyn std::error::Error) -> String {
    userconfig::error_chain(e)
}

impl From<userconfig::Error> for Failure {
    fn from(e: userconfig::Error) -> Self {
        let message = explain(&e);
        let mut failure = if e.is_invalid_input() {
            Failure::invalid(message)
        } else if e.conflict().is_some() {
            Failure::with("conflict", EXIT_CONFLICT, message)
        } else if matches!(e, userconfig::Error::TooManyConflicts { .. }) {
            Failure::with("too_many_conflicts", EXIT_CONFLICT, message)
        } else if matches!(e, userconfig::Error::VersionNotKept { .. }) {
            Failure::not_found(message)
        } else if matches!(e, userconfig::Error::Settings(_)) {
            Failure::usage(message)
        } else if e.is_transient() {
            Failure::unavailable(message)
        } else if e.is_read_only() {
            Failure::with("read_only", EXIT_UNAVAILABLE, message)
        } else {
            Failure::new(message)
        };
        failure.current = e.conflict();
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_error_has_its_exit_code() {
        let cases: [(userconfig::Error, u8); 6] = [
            (
                userconfig::Error::InvalidUserId { reason: "empty" },
                EXIT_INVALID,
            ),
            (userconfig::Error::InvalidConfig("x".into()), EXIT_INVALID),
            (
                userconfig::Error::Conflict {
                    expected: 1,
                    current: 2,
                },
                EXIT_CONFLICT,
            ),
            (
                userconfig::Error::TooManyConflicts { attempts: 50 },
                EXIT_CONFLICT,
            ),
            (userconfig::Error::Settings("bad".into()), EXIT_USAGE),
            (
                userconfig::Error::Cache(userconfig::CacheError::unavailable(
                    "postgres",
                    std::io::Error::other("down"),
                )),
                EXIT_UNAVAILABLE,
            ),
        ];
        for (error, code) in cases {
            let failure = Failure::from(error);
            assert_eq!(failure.code, code, "{failure}");
            assert_eq!(failure.to_json()["error"]["exit_code"], code);
        }
        let conflict = Failure::from(userconfig::Error::Conflict {
            expected: 1,
            current: 9,
        });
        assert_eq!(conflict.to_json()["error"]["current_version"], 9);
    }
}
