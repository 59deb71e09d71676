//! A user's past configurations: the history the database keeps (every change, by any writer,
//! for the database's history retention, 30 days by default), reading a version back, rolling
//! back to one (a compare-and-set to the old value: a new version, never a rewrite of the
//! past), the difference between two versions as a JSON Patch, and deleting a user together
//! with their history (deletion for privacy).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tiercache_core::{Revision, Version};

use crate::config::UserConfig;
use crate::error::{Error, Result};
use crate::{UserConfigStorage, check_user_id};

/// Most versions one call to [`UserConfigStorage::history`] returns.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// One past version of a user's configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConfigRevision {
    /// The change's version.
    pub version: Version,
    /// The configuration it stored; `None`: the change deleted it (the user read as the
    /// defaults from then on).
    pub config: Option<Arc<UserConfig>>,
    /// When it was written.
    pub at: SystemTime,
    /// Who wrote it, as the database knows: the writing session's `application_name` (`psql`,
    /// a service's name; `tiercache` for this crate unless set).
    pub author: Option<String>,
}

impl ConfigRevision {
    fn from_revision(revision: Revision<UserConfig>) -> Self {
        ConfigRevision {
            version: revision.version,
            config: revision.value,
            at: revision.at,
            author: revision.author,
        }
    }

    /// The configuration as the user read it then: the one stored, or the defaults after a
    /// delete.
    #[must_use]
    pub fn config_or_defaults(&self, user_id: &str) -> Arc<UserConfig> {
        self.config
            .clone()
            .unwrap_or_else(|| Arc::new(UserConfig::default_for(user_id)))
    }

    /// [`at`](Self::at) as RFC 3339 in UTC, to the millisecond (`2026-12-07T13:09:46.123Z`).
    #[must_use]
    pub fn at_rfc3339(&self) -> String {
        rfc3339(self.at)
    }
}

/// `at` as RFC 3339 in UTC, to the millisecond.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

impl UserConfigStorage {
    /// The user's past configurations, newest first, at most `limit` (up to
    /// [`MAX_HISTORY_PAGE`]): every change the database kept (its history retention), made
    /// through this crate or not, deletes included.
    ///
    /// # Errors
    /// [`Error::InvalidUserId`] before any I/O; the database's error; a database that keeps
    /// no history (a source of your own) is [`Error::Cache`] with `Unsupported`.
    pub async fn history(&self, user_id: &str, limit: usize) -> Result<Vec<ConfigRevision>> {
        self.history_before(user_id, None, limit).await
    }

    /// [`history`](Self::history) from the version before `before` back (to page through a
    /// long history: pass the last version of the previous page).
    ///
    /// # Errors
    /// As [`history`](Self::history).
    pub async fn history_before(
        &self,
        user_id: &str,
        before: Option<Version>,
        limit: usize,
    ) -> Result<Vec<ConfigRevision>> {
        check_user_id(user_id)?;
        let limit = limit.min(MAX_HISTORY_PAGE);
        let user = user_id.to_owned();
        let source = self.cache.source();
        let found = self
            .cache
            .source_call("history", source.history(&user, before, limit))
            .await?;
        Ok(found
            .into_iter()
            .map(ConfigRevision::from_revision)
            .collect())
    }

    /// The user's configuration at `version`, if the database still keeps it (the current
    /// version always).
    ///
    /// # Errors
    /// As [`history`](Self::history).
    pub async fn get_user_config_at(
        &self,
        user_id: &str,
        version: Version,
    ) -> Result<Option<ConfigRevision>> {
        check_user_id(user_id)?;
        let user = user_id.to_owned();
        let source = self.cache.source();
        let found = self
            .cache
            .source_call("revision", source.revision(&user, version))
            .await?;
        Ok(found.map(ConfigRevision::from_revision))
    }

    /// Rolls the user's configuration back to what it was at `to_version`: a new version that
    /// stores that configuration again (or deletes it, if that version was a delete), written
    /// as a compare-and-set against the version stored now (read from the database) or
    /// against `expected` when given. A write that lands in between makes it fail with
    /// [`Error::Conflict`] rather than be undone unseen. Returns the new version (the stored
    /// one if the configuration is already that).
    ///
    /// # Errors
    /// [`Error::VersionNotKept`] if the database keeps no such version of this user;
    /// [`Error::Conflict`]; the old configuration's own input errors if it no longer passes
    /// today's checks; otherwise as [`update_user_config`](Self::update_user_config).
    pub async fn rollback_user_config(
        &self,
        user_id: &str,
        to_version: Version,
        expected: Option<Version>,
    ) -> Result<Version> {
        let target =
            self.get_user_config_at(user_id, to_version)
                .await?
                .ok_or(Error::VersionNotKept {
                    version: to_version,
                })?;
        let expected = match expected {
            Some(expected) => expected,
            None => self.load_user_config(user_id).await?.version,
        };
        match target.config {
            Some(config) => self.update_user_config_if(user_id, expected, &config).await,
            None if expected == 0 => Ok(0),
            None => self.delete_user_config_if(user_id, expected).await,
        }
    }

    /// The difference between the user's configurations at `from` and at `to` (each the
    /// defaults where it was a delete), as a JSON Patch (RFC 6902) that turns the first into
    /// the second.
    ///
    /// # Errors
    /// [`Error::VersionNotKept`] for a version the database does not keep; otherwise as
    /// [`history`](Self::history).
    pub async fn diff_user_config(
        &self,
        user_id: &str,
        from: Version,
        to: Version,
    ) -> Result<serde_json::Value> {
        let mut sides = Vec::with_capacity(2);
        for version in [from, to] {
            let revision = self
                .get_user_config_at(user_id, version)
                .await?
                .ok_or(Error::VersionNotKept { version })?;
            let config = revision.config_or_defaults(user_id);
            sides.push(serde_json::to_value(&*config).expect("configurations serialize"));
        }
        Ok(serde_json::Value::Array(crate::diff::json_patch(
            &sides[0], &sides[1],
        )))
    }

    /// Deletes the user's configuration and every past version of it (deletion for privacy:
    /// the history keeps nothing of the user afterwards; the caches hold "not found", as after
    /// [`delete_user_config`](Self::delete_user_config)). Returns the delete's version (0 if
    /// nothing was stored).
    ///
    /// # Errors
    /// As [`delete_user_config`](Self::delete_user_config); the history's purge after it, on
    /// its own (the delete stands; call again to purge).
    pub async fn purge_user_config(&self, user_id: &str) -> Result<Version> {
        let version = self.delete_user_config(user_id).await?;
        self.purge_history(user_id).await?;
        Ok(version)
    }

    /// Removes every past version of the user's configuration from the history, and returns
    /// how many (the configuration stored now, if any, stays; with
    /// [`purge_user_config`](Self::purge_user_config) it goes first). For a caller that
    /// deletes in a way of its own (a compare-and-set) and then purges.
    ///
    /// # Errors
    /// As [`history`](Self::history).
    pub async fn purge_history(&self, user_id: &str) -> Result<u64> {
        check_user_id(user_id)?;
        let user = user_id.to_owned();
        let source = self.cache.source();
        Ok(self
            .cache
            .source_call("purge_history", source.purge_history(&user))
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_649_786_123);
        assert_eq!(rfc3339(at), "2026-12-07T13:23:06.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
