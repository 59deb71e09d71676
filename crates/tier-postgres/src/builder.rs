//! [`PostgresSourceBuilder`]: the server, the table, the pool and the feed's settings.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tiercache_core::{Counter, Error, Result, StorageKey};
use tiercache_sql::{RowStats, valid_identifier};
use tokio::sync::OnceCell;

use crate::connection::Redacted;
use crate::migrate::{Migrations, Names};
use crate::source::{PostgresSource, Statements};
use crate::{
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_CHANGE_RETENTION, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ELECT_EVERY, DEFAULT_FEED_POLL, DEFAULT_MAX_CONNECTIONS, DEFAULT_NAME, DEFAULT_SCHEMA,
    DEFAULT_STATEMENT_TIMEOUT, DEFAULT_TABLE,
};

/// Configures a [`PostgresSource`]; see [`PostgresSource::builder`].
#[must_use]
pub struct PostgresSourceBuilder<K, V> {
    url: Option<String>,
    options: Option<PgConnectOptions>,
    schema: String,
    table: String,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
    connect_timeout: Duration,
    change_retention: Duration,
    history_retention: Duration,
    application_name: String,
    feed_poll: Duration,
    elect_every: Duration,
    logical: bool,
    run_migrations: bool,
    name: String,
    _types: PhantomData<fn() -> (K, V)>,
}

/// The password in a `postgres://user:password@host/…` URL (percent-decoded), if any.
#[cfg(feature = "logical")]
fn password_of(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let encoded = parsed.password()?.as_bytes();
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let hex = encoded
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (encoded[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                bytes.push(byte);
                i += 3;
            }
            (byte, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

impl<K, V> Default for PostgresSourceBuilder<K, V> {
    fn default() -> Self {
        PostgresSourceBuilder {
            url: None,
            options: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            change_retention: DEFAULT_CHANGE_RETENTION,
            history_retention: crate::DEFAULT_HISTORY_RETENTION,
            application_name: "tiercache".to_owned(),
            feed_poll: DEFAULT_FEED_POLL,
            elect_every: DEFAULT_ELECT_EVERY,
            logical: true,
            run_migrations: true,
            name: DEFAULT_NAME.to_owned(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for PostgresSourceBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = match (&self.options, &self.url) {
            (Some(o), _) => format!("{:?}", Redacted(o)),
            (None, Some(url)) => url
                .parse::<PgConnectOptions>()
                .map(|o| format!("{:?}", Redacted(&o)))
                .unwrap_or_else(|_| "<invalid url>".to_owned()),
            (None, None) => "<from PG* environment>".to_owned(),
        };
        f.debug_struct("PostgresSourceBuilder")
            .field("server", &server)
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl<K: StorageKey, V: Serialize + DeserializeOwned + Send + Sync + 'static>
    PostgresSourceBuilder<K, V>
{
    /// The server, as a URL: `postgres://user[:password]@host[:port]/database[?sslmode=...]`;
    /// use `sslmode=verify-full` (with `sslrootcert=...` for a private CA) to check the
    /// server's certificate. The URL is never logged, and the password never appears in
    /// `Debug` output. Without a URL or [`connect_options`](Self::connect_options), the libpq
    /// `PG*` environment variables apply.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The server, as sqlx connect options (instead of a URL; takes precedence over one).
    pub fn connect_options(mut self, options: PgConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The schema of the table, created if missing; a plain identifier
    /// (`^[a-z_][a-z0-9_]{0,62}$`). Defaults to [`DEFAULT_SCHEMA`].
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The table, a plain identifier (`^[a-z_][a-z0-9_]{0,62}$`). Each table is a separate
    /// store with its own migration bookkeeping. Defaults to [`DEFAULT_TABLE`].
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Pool size. Defaults to [`DEFAULT_MAX_CONNECTIONS`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Time limit for getting a pooled connection. Defaults to [`DEFAULT_ACQUIRE_TIMEOUT`].
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Time limit of one statement, set as `statement_timeout` on each connection; a statement
    /// that runs longer is cancelled by the server and the call fails with [`Error::Timeout`].
    /// Defaults to [`DEFAULT_STATEMENT_TIMEOUT`].
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Time limit of one connection attempt the tier makes outside its pool: after an acquire
    /// time-out, a direct attempt tells a server that refuses connections or does not answer
    /// (the call fails with [`Error::Unavailable`] saying so) from a pool that is merely busy.
    /// sqlx 0.9 has no per-attempt limit for the pool's own connections: those are bounded by
    /// [`acquire_timeout`](Self::acquire_timeout), within which a refused connection is
    /// retried. Defaults to [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an entry stays in the change log: how long a chain's follower may be cut off
    /// and still catch up without emptying its caches. Followers prune older entries (one at a
    /// time). Defaults to [`DEFAULT_CHANGE_RETENTION`].
    pub fn change_retention(mut self, retention: Duration) -> Self {
        self.change_retention = retention;
        self
    }

    /// How long a past version stays in the history (`PostgresSource::history`, rollback):
    /// the elected follower deletes older ones, in batches, once a minute. Defaults to
    /// [`DEFAULT_HISTORY_RETENTION`](crate::DEFAULT_HISTORY_RETENTION) (30 days).
    pub fn history_retention(mut self, retention: Duration) -> Self {
        self.history_retention = retention;
        self
    }

    /// The `application_name` of the tier's sessions: what the history records as the author
    /// of the changes made through it (a service names itself). Defaults to `tiercache`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Whether the tier applies missing migrations on first use (`true`, the default), or only
    /// checks that none is missing and fails with a message naming `userconfig migrate`
    /// (`false`: for a role that may read and write the table but not create objects; run
    /// [`PostgresSource::migrate`] with a privileged role first). An explicit
    /// [`PostgresSource::migrate`] applies them either way.
    pub fn run_migrations(mut self, on: bool) -> Self {
        self.run_migrations = on;
        self
    }

    /// Interval at which the elected follower reads the change log: the longest a change made
    /// with plain SQL waits before every instance applies it (a change made through a chain
    /// is applied by its own write path at once). Each read is one indexed statement on the
    /// elected follower's connection, one for the whole fleet. Defaults to
    /// [`DEFAULT_FEED_POLL`].
    pub fn feed_poll(mut self, interval: Duration) -> Self {
        self.feed_poll = interval;
        self
    }

    /// Whether the elected follower streams the WAL (logical decoding, feature `logical`)
    /// where the server allows it: `wal_level = logical`, a role with `REPLICATION`, a free
    /// replication slot, `CREATE` on the database the first time (for the publication), the
    /// password in the URL (or `PGPASSWORD`), no TLS. Writers then emit a logical message
    /// instead of a log entry, and changes reach every instance as they commit rather than at
    /// the next read of the log.
    /// Where it does not, the feed reads the log, and says why at info. Defaults to `true`.
    pub fn logical_decoding(mut self, on: bool) -> Self {
        self.logical = on;
        self
    }

    /// How often a follower that is not elected tries to be (the longest a handover waits
    /// after the elected follower's session ended). Defaults to [`DEFAULT_ELECT_EVERY`].
    pub fn elect_every(mut self, interval: Duration) -> Self {
        self.elect_every = interval;
        self
    }

    /// The tier's name in stats and errors. Defaults to [`DEFAULT_NAME`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the tier. Nothing connects until the first call, so no server is needed; a Tokio
    /// runtime is (sqlx's pool starts its maintenance task here).
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that does not parse (the message never repeats it), a schema
    /// or table name that is not a plain identifier (`^[a-z_][a-z0-9_]{0,62}$`), a pool of zero
    /// connections, a zero time limit, or a call outside a Tokio runtime.
    pub fn build(self) -> Result<PostgresSource<K, V>> {
        let options = match (self.options, &self.url) {
            (Some(o), _) => o,
            (None, Some(url)) => url.parse::<PgConnectOptions>().map_err(|_| {
                Error::Config(
                    "the PostgreSQL URL does not parse; expected postgres://user@host:port/database"
                        .into(),
                )
            })?,
            (None, None) => PgConnectOptions::new(),
        };
        for (what, name) in [("schema", &self.schema), ("table", &self.table)] {
            if !valid_identifier(name) {
                return Err(Error::Config(format!(
                    "{what} `{name}` is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 \
                     characters)"
                )));
            }
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        if self.acquire_timeout.is_zero()
            || self.statement_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.change_retention.is_zero()
            || self.history_retention.is_zero()
            || self.feed_poll.is_zero()
            || self.elect_every.is_zero()
        {
            return Err(Error::Config(
                "acquire_timeout, statement_timeout, connect_timeout, change_retention, \
                 history_retention, feed_poll and elect_every must be positive"
                    .into(),
            ));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "PostgresSource::builder().build() must be called inside a Tokio runtime".into(),
            ));
        }
        let options = options
            .options([(
                "statement_timeout",
                format!("{}ms", self.statement_timeout.as_millis()),
            )])
            .application_name(&self.application_name);
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            // No ping before each call (a round trip, a fifth of a read): reads retry on a
            // connection found dead, writes ping their own (`live_connection`).
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let names = Names::new(&self.schema, &self.table);
        let sql = Statements {
            get: names.fill("SELECT value::text, version FROM {table} WHERE key = $1"),
            get_many: names
                .fill("SELECT key, value::text, version FROM {table} WHERE key = ANY($1)"),
            write: names.fill("SELECT outcome, version FROM {write_fn}($1, $2::jsonb, $3)"),
            delete: names.fill("SELECT outcome, version FROM {delete_fn}($1, $2)"),
            write_by: names
                .fill("SELECT outcome, version FROM {write_by_fn}($1, $2::jsonb, $3, $4)"),
            delete_by: names.fill("SELECT outcome, version FROM {delete_by_fn}($1, $2, $3)"),
            history: names.fill(
                "SELECT value::text, version, (extract(epoch FROM at) * 1000000)::bigint, author \
                 FROM {history} WHERE key = $1 AND version < $2 \
                 ORDER BY version DESC LIMIT $3",
            ),
            // The current version may be older than the history keeps: the table has it.
            revision: names.fill(
                "SELECT value::text, version, (extract(epoch FROM at) * 1000000)::bigint, author \
                 FROM {history} WHERE key = $1 AND version = $2 \
                 UNION ALL \
                 SELECT value::text, version, (extract(epoch FROM updated_at) * 1000000)::bigint, \
                   NULL FROM {table} WHERE key = $1 AND version = $2 \
                 LIMIT 1",
            ),
            purge_history: names.fill(
                "DELETE FROM {history} WHERE key = $1 AND version IN \
                 (SELECT version FROM {history} WHERE key = $1 LIMIT $2)",
            ),
        };
        let migrations = Arc::new(Migrations {
            options: options.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
            name: self.name.clone(),
            acquire_timeout: self.acquire_timeout,
            statement_timeout: self.statement_timeout,
            apply_on_first_use: self.run_migrations,
            done: OnceCell::new(),
        });
        #[cfg(feature = "logical")]
        let logical = self.logical.then(|| {
            crate::feed::LogicalSettings::new(
                &options,
                self.url.as_deref().and_then(password_of),
                crate::migrate::channel(&self.schema, &self.table),
            )
        });
        Ok(PostgresSource {
            pool,
            options,
            schema: self.schema,
            table: self.table,
            sql,
            feed_sql: Arc::new(crate::feed::Statements::new(&names)),
            name: self.name,
            statement_timeout: self.statement_timeout,
            connect_timeout: self.connect_timeout,
            max_connections: self.max_connections,
            change_retention: self.change_retention,
            history_retention: self.history_retention,
            feed_poll: self.feed_poll,
            elect_every: self.elect_every,
            migrations,
            busy_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: Instant::now(),
            stats: RowStats::default(),
            probes: Counter::default(),
            feed_counters: Arc::default(),
            #[cfg(feature = "logical")]
            logical,
            _types: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tier = PostgresSource<String, serde_json::Value>;

    #[tokio::test]
    async fn debug_never_shows_the_password() {
        let url = "postgres://app:s3cret-sentinel@db.internal:5433/app?sslmode=require";
        let builder = Tier::builder().url(url);
        let printed = format!("{builder:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        let tier = builder.build().unwrap();
        let printed = format!("{tier:?}");
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        assert!(printed.contains("app@db.internal:5433/app"), "{printed}");
        assert!(printed.contains("tiercache_entries"), "{printed}");

        let options = PgConnectOptions::new()
            .host("db.internal")
            .username("app")
            .password("s3cret-sentinel")
            .database("app");
        let builder = Tier::builder().connect_options(options).schema("cfg");
        let printed = format!("{builder:?}");
        let printed = format!("{printed} {:?}", builder.build().unwrap());
        assert!(!printed.contains("s3cret-sentinel"), "{printed}");
        assert!(printed.contains("\"cfg\""), "{printed}");
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Tier::builder().build().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }

    #[tokio::test]
    async fn bad_configuration_is_rejected() {
        let b = Tier::builder;
        let err = b()
            .url("postgres://x:s3cret-sentinel@h:notaport/d")
            .build()
            .unwrap_err();
        assert!(!err.to_string().contains("s3cret-sentinel"), "{err}");
        assert!(b().schema("Public").build().is_err());
        assert!(b().schema("a;drop").build().is_err());
        assert!(b().table("t\"x").build().is_err());
        assert!(b().table("t".repeat(64)).build().is_err());
        assert!(b().table("t".repeat(63)).build().is_ok());
        assert!(b().max_connections(0).build().is_err());
        assert!(b().statement_timeout(Duration::ZERO).build().is_err());
        assert!(b().acquire_timeout(Duration::ZERO).build().is_err());
        assert!(b().connect_timeout(Duration::ZERO).build().is_err());
        for bad in [b().schema(""), b().table("1x"), b().max_connections(0)] {
            assert!(matches!(bad.build(), Err(Error::Config(_))));
        }
    }
}
