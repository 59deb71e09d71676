//! The environment variables [`UserConfigStorage::from_env`](crate::UserConfigStorage::from_env)
//! reads: one table, [`ENV_VARS`], which README.md mirrors (a test keeps the two in step).

use std::time::Duration;

use crate::builder::UserConfigStorageBuilder;
use crate::error::{Error, Result};

/// Every variable `from_env` reads, with what it sets: `(name, meaning)`. An empty variable is
/// the same as an unset one.
pub const ENV_VARS: &[(&str, &str)] = &[
    (
        "REDIS_URL",
        "Redis server (`redis://`, `rediss://` for TLS); unset: no Redis tier",
    ),
    (
        "REDIS_CLUSTER_NODES",
        "a Redis Cluster's seed nodes, comma-separated URLs (feature `cluster`), instead of REDIS_URL",
    ),
    (
        "DATABASE_URL",
        "`postgres://…` or `sqlite:path`; unset: the embedded SQLite file",
    ),
    (
        "USERCONFIG_SQLITE_PATH",
        "the embedded SQLite file when DATABASE_URL is unset (default `userconfig.sqlite3`)",
    ),
    (
        "USERCONFIG_RUN_MIGRATIONS",
        "`false`: check the PostgreSQL migrations instead of applying them (a least-privilege role; run `userconfig migrate` first); default `true`",
    ),
    (
        "USERCONFIG_MEMORY_CAPACITY",
        "memory tier capacity in entries (default 500)",
    ),
    (
        "USERCONFIG_MEMORY_TTL_SECS",
        "memory tier TTL in seconds (default 300)",
    ),
    (
        "USERCONFIG_REDIS_TTL_SECS",
        "Redis TTL in seconds (default 1800)",
    ),
    (
        "USERCONFIG_REDIS_PREFIX",
        "Redis key prefix, so that several storages share one Redis (default `userconfig:`)",
    ),
];

impl UserConfigStorageBuilder {
    /// Applies the environment's settings to this builder (see [`ENV_VARS`]); a variable that
    /// is unset or empty leaves the builder's setting alone.
    ///
    /// # Errors
    /// [`Error::Settings`] naming a variable that does not parse (the message never repeats a
    /// URL).
    pub fn from_env(self) -> Result<Self> {
        self.with_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables read through `lookup` (tests).
    pub(crate) fn with_lookup(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(url) = get("REDIS_URL") {
            self = self.redis_url(url);
        }
        #[cfg(feature = "cluster")]
        if let Some(nodes) = get(crate::storage::REDIS_CLUSTER_NODES_VAR) {
            self = self.redis_cluster(
                nodes
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned),
            );
        }
        #[cfg(not(feature = "cluster"))]
        if get("REDIS_CLUSTER_NODES").is_some() {
            return Err(Error::Settings(
                "REDIS_CLUSTER_NODES is set, but userconfig was built without feature `cluster`"
                    .into(),
            ));
        }
        if let Some(url) = get("DATABASE_URL") {
            self = self.database_url(url);
        }
        if let Some(path) = get("USERCONFIG_SQLITE_PATH") {
            self = self.sqlite_path(path);
        }
        if let Some(value) = get("USERCONFIG_RUN_MIGRATIONS") {
            let on = match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(Error::Settings(
                        "USERCONFIG_RUN_MIGRATIONS must be true or false".into(),
                    ));
                }
            };
            self = self.run_migrations(on);
        }
        if let Some(value) = get("USERCONFIG_MEMORY_CAPACITY") {
            let capacity = value
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| {
                    Error::Settings(
                        "USERCONFIG_MEMORY_CAPACITY must be a positive whole number".into(),
                    )
                })?;
            self = self.memory_capacity(capacity);
        }
        if let Some(value) = get("USERCONFIG_MEMORY_TTL_SECS") {
            self = self.memory_ttl(seconds("USERCONFIG_MEMORY_TTL_SECS", &value)?);
        }
        if let Some(value) = get("USERCONFIG_REDIS_TTL_SECS") {
            self = self.redis_ttl(seconds("USERCONFIG_REDIS_TTL_SECS", &value)?);
        }
        if let Some(prefix) = get("USERCONFIG_REDIS_PREFIX") {
            self = self.redis_prefix(prefix);
        }
        Ok(self)
    }
}

/// A positive, finite number of seconds (fractions allowed).
fn seconds(name: &str, value: &str) -> Result<Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| Error::Settings(format!("{name} must be a positive number of seconds")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn builder(vars: &[(&str, &str)]) -> Result<UserConfigStorageBuilder> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        UserConfigStorageBuilder::default().with_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn the_knobs_reach_the_builder() {
        let b = builder(&[
            ("USERCONFIG_MEMORY_CAPACITY", "42"),
            ("USERCONFIG_MEMORY_TTL_SECS", "1.5"),
            ("USERCONFIG_REDIS_TTL_SECS", "60"),
            ("USERCONFIG_REDIS_PREFIX", "svc:"),
            ("USERCONFIG_SQLITE_PATH", "/tmp/x.sqlite3"),
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("DATABASE_URL", "   "),
            ("USERCONFIG_RUN_MIGRATIONS", "off"),
        ])
        .unwrap();
        let shown = format!("{b:?}");
        assert!(shown.contains("memory_capacity: 42"), "{shown}");
        assert!(shown.contains("memory_ttl: 1.5s"), "{shown}");
        assert!(shown.contains("redis_ttl: 60s"), "{shown}");
        assert!(shown.contains("redis_prefix: \"svc:\""), "{shown}");
        assert!(shown.contains("/tmp/x.sqlite3"), "{shown}");
        assert!(shown.contains("redis_url: Some(\"<set>\")"), "{shown}");
        assert!(shown.contains("run_migrations: false"), "{shown}");
        // An empty variable is an unset one.
        assert!(shown.contains("database_url: None"), "{shown}");
    }

    #[test]
    fn a_malformed_knob_is_named_and_its_value_not_repeated() {
        for (name, value) in [
            ("USERCONFIG_MEMORY_CAPACITY", "0"),
            ("USERCONFIG_MEMORY_CAPACITY", "many"),
            ("USERCONFIG_MEMORY_TTL_SECS", "-1"),
            ("USERCONFIG_REDIS_TTL_SECS", "inf"),
            ("USERCONFIG_REDIS_TTL_SECS", "secret-looking"),
            ("USERCONFIG_RUN_MIGRATIONS", "maybe"),
        ] {
            let error = builder(&[(name, value)]).unwrap_err();
            let text = error.to_string();
            assert!(matches!(error, Error::Settings(_)), "{text}");
            assert!(text.contains(name), "{text}");
            assert!(!text.contains(value), "{text}");
        }
    }

    #[test]
    fn every_variable_is_in_the_readme_table() {
        let readme = include_str!("../../../README.md");
        for (name, _) in ENV_VARS {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "README.md's environment table lacks {name}"
            );
        }
    }
}
