//! Logical decoding: where the server allows it, the elected follower takes the changes from
//! the WAL, pushed to it as they commit, instead of reading the log every `feed_poll`.
//!
//! Writers then add no log entry at all: the trigger emits a transactional logical message
//! (`pg_logical_emit_message`, prefix the table's channel, content `op version key`), a WAL
//! record and nothing else, decoded in commit order through a replication slot with the
//! built-in `pgoutput` plugin (its publication has no table: only the messages are sent). The
//! switch `<table>_emit` tells the trigger which to do; the elected follower turns it on once
//! its stream runs, and off (flushing every cache) when it cannot run one (`mode.rs`). The log
//! is still read every `feed_poll` meanwhile: a writer that read the switch before it turned
//! wrote an entry there.
//!
//! A slot has one consumer at a time: only the elected follower streams. When its session ends
//! the slot stays, and so does everything committed since it last acknowledged: the next one
//! elected resumes there. While no instance runs the slot keeps the server's WAL: set
//! `max_slot_wal_keep_size` (docs/operations.md).
//!
//! What it needs: `wal_level = logical`, a role that may replicate (`REPLICATION`), a free slot,
//! a publication (a database-wide object, made on the first stream by a role with `CREATE` on
//! the database; nothing is made on a server that cannot stream), the password in the URL (or
//! `PGPASSWORD`), and no TLS (the replication client is built without it). Without any of it,
//! the feed reads the log (stock mode), and says why, once.

use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::wire::Entry;

/// How long the replication session may take to log in and start streaming.
const START_WITHIN: Duration = Duration::from_secs(10);

/// PostgreSQL's epoch (2000-01-01) in Unix seconds.
const POSTGRES_EPOCH: u64 = 946_684_800;

/// Where the stream reads from, and how to reach it.
#[derive(Clone)]
pub(crate) struct Settings {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    /// For the set-up's own connection.
    options: PgConnectOptions,
    /// The slot, the publication and the messages' prefix: the table's channel name.
    pub(crate) name: String,
    /// Why it cannot stream at all, whatever the server says.
    refused: Option<&'static str>,
}

impl std::fmt::Debug for Settings {
    /// Never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// From the source's connection settings (`password`: from its URL, else `PGPASSWORD`).
    pub(crate) fn new(options: &PgConnectOptions, password: Option<String>, name: String) -> Self {
        let refused = if options.get_socket().is_some() || options.get_host().starts_with('/') {
            Some("the source connects through a Unix socket")
        } else if matches!(
            options.get_ssl_mode(),
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
        ) {
            Some("the source requires TLS, which the replication client is built without")
        } else {
            None
        };
        Settings {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            user: options.get_username().to_owned(),
            password: password
                .or_else(|| std::env::var("PGPASSWORD").ok())
                .unwrap_or_default(),
            database: options.get_database().unwrap_or("postgres").to_owned(),
            options: options.clone(),
            name,
            refused,
        }
    }
}

/// What an attempt to stream the WAL came to.
pub(crate) enum Setup {
    /// The stream runs, from where the slot was last acknowledged.
    Streaming(Stream),
    /// The server or the role does not allow it (why).
    Refused(String),
    /// Writers emit messages and the slot they were emitting to is gone (dropped, or its WAL
    /// removed): the log must be the feed again (every cache flushed once) before a new slot
    /// is made, so that no message is emitted while no slot keeps it.
    SlotGone,
    /// It could not start now (why); worth trying again soon.
    Failed(String),
}

/// Tries to stream the WAL: checks what the server allows, sets up the publication and the
/// slot when they are missing and it may, and connects. Run in a task of its own on its own
/// connection, by the elected follower: making a slot waits for every transaction that runs,
/// and the feed must not wait with it. `emitting`: whether writers emit messages now.
pub(crate) async fn setup(settings: Settings, emitting: bool) -> Setup {
    if let Some(why) = settings.refused {
        return Setup::Refused(why.to_owned());
    }
    let mut conn = match PgConnection::connect_with(&settings.options).await {
        Ok(conn) => conn,
        Err(error) => return Setup::Failed(format!("could not connect ({error})")),
    };
    match prepare(&mut conn, &settings, emitting).await {
        Ok(None) => {}
        Ok(Some(setup)) => return setup,
        Err(error) => return Setup::Failed(error.to_string()),
    }
    drop(conn);
    match Stream::start(&settings).await {
        Ok(stream) => Setup::Streaming(stream),
        Err(why) => Setup::Failed(format!("could not stream the WAL ({why})")),
    }
}

/// The checks and the set-up before streaming: `None` when the slot is there.
async fn prepare(
    conn: &mut PgConnection,
    settings: &Settings,
    emitting: bool,
) -> Result<Option<Setup>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT current_setting('wal_level'), \
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
                EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1), \
                (SELECT wal_status FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database = current_database())",
    )
    .bind(&settings.name)
    .fetch_one(&mut *conn)
    .await?;
    let wal_level: String = row.try_get(0)?;
    let may_replicate: Option<bool> = row.try_get(1)?;
    let published: bool = row.try_get(2)?;
    let mut slot: Option<String> = row.try_get(3)?;
    if wal_level != "logical" {
        return Ok(Some(Setup::Refused(format!(
            "the server's wal_level is {wal_level}, not logical"
        ))));
    }
    if may_replicate != Some(true) {
        return Ok(Some(Setup::Refused(
            "the role may not replicate (no REPLICATION attribute)".into(),
        )));
    }
    if !published {
        // The name is a validated identifier (the channel's).
        let created = sqlx::query(AssertSqlSafe(format!(
            "CREATE PUBLICATION \"{}\"",
            settings.name
        )))
        .execute(&mut *conn)
        .await;
        if let Err(error) = created {
            return Ok(Some(Setup::Refused(format!(
                "no publication {0} and this role may not create it ({error}); have a role \
                 that may run: CREATE PUBLICATION \"{0}\"",
                settings.name
            ))));
        }
    }
    if slot.as_deref() == Some("lost") {
        // Its WAL was removed (max_slot_wal_keep_size): what it kept is gone.
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&settings.name)
            .execute(&mut *conn)
            .await?;
        slot = None;
    }
    if slot.is_some() {
        return Ok(None);
    }
    if emitting {
        return Ok(Some(Setup::SlotGone));
    }
    // A slot is consistent once every transaction that runs now has ended: bounded, so that
    // one long transaction costs an attempt, not a connection held for hours.
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL statement_timeout = '60s'")
        .execute(&mut *tx)
        .await?;
    let created = sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&settings.name)
        .execute(&mut *tx)
        .await;
    match created {
        Ok(_) => {
            tx.commit().await?;
            Ok(None)
        }
        Err(error) => Ok(Some(Setup::Failed(format!(
            "no replication slot could be made ({error})"
        )))),
    }
}

/// The stream of one slot.
pub(crate) struct Stream {
    client: ReplicationClient,
    prefix: String,
    /// The transaction being received: its messages, and when it committed.
    pending: Vec<Entry>,
    /// Whole transactions received and not yet applied, and the position after the last.
    committed: Vec<Entry>,
    through: Option<Lsn>,
}

/// What one event left ready to apply.
pub(crate) enum Step {
    /// Nothing yet.
    Nothing,
    /// Committed changes to apply (then [`Stream::applied`]).
    Ready,
}

impl Stream {
    /// Connects and starts streaming from where the slot was last acknowledged.
    pub(crate) async fn start(settings: &Settings) -> Result<Stream, String> {
        let config = ReplicationConfig::new(
            settings.host.clone(),
            settings.user.clone(),
            settings.password.clone(),
            settings.database.clone(),
            settings.name.clone(),
            settings.name.as_str(),
        )
        .with_port(settings.port)
        .with_tls(TlsConfig::disabled())
        .with_application_name("tiercache-feed")
        .with_status_interval(Duration::from_millis(200));
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| e.to_string())?;
        // `connect` returns before the session logs in and starts replication (in the crate's
        // own task): only a started stream holds the slot and receives what writers emit.
        match tokio::time::timeout(START_WITHIN, client.wait_started()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err(format!("not started within {START_WITHIN:?}")),
        }
        Ok(Stream {
            client,
            prefix: settings.name.clone(),
            pending: Vec::new(),
            committed: Vec::new(),
            through: None,
        })
    }

    /// Waits for the next event and takes it in (cancel-safe: a channel's receive).
    pub(crate) async fn next(&mut self) -> Result<Step, String> {
        let event = self.client.recv().await.map_err(|e| e.to_string())?;
        let Some(event) = event else {
            return Err("the replication stream ended".into());
        };
        Ok(self.take(event))
    }

    /// Takes in the events already received, without waiting, up to `limit` changes ready.
    pub(crate) async fn drain(&mut self, limit: usize) -> Result<(), String> {
        while self.committed.len() < limit {
            match tokio::time::timeout(Duration::ZERO, self.client.recv()).await {
                Ok(Ok(Some(event))) => {
                    let _ = self.take(event);
                }
                Ok(Ok(None)) => return Err("the replication stream ended".into()),
                Ok(Err(error)) => return Err(error.to_string()),
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn take(&mut self, event: ReplicationEvent) -> Step {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.pending.clear();
                // Each entry carries its transaction's commit time.
                self.pending.push(Entry {
                    txid: u64::MAX,
                    version: 0,
                    op: b'B',
                    shared_missed: false,
                    at_ms: commit_ms(commit_time_micros),
                    key: None,
                });
                Step::Nothing
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } if prefix == self.prefix => {
                let at_ms = self.pending.first().map_or(0, |b| b.at_ms);
                // A message that does not parse is a change nobody can name: every key.
                let entry = parse(&content, at_ms).unwrap_or_else(|| {
                    tracing::warn!(prefix = %self.prefix,
                        "change feed: a writer's message does not parse: every cache is flushed");
                    Entry {
                        txid: u64::MAX,
                        version: 0,
                        op: b'T',
                        shared_missed: false,
                        at_ms,
                        key: Some(String::new()),
                    }
                });
                self.pending.push(entry);
                Step::Nothing
            }
            ReplicationEvent::KeepAlive { wal_end, .. }
                if self.pending.is_empty()
                    && self.committed.is_empty()
                    && self.through.is_none() =>
            {
                // The server has decoded and sent everything before `wal_end` (its `sentPtr`),
                // and every transaction of ours in it is applied: the slot may let go of it.
                // Without this, while only other tables change (transactions with nothing for
                // us are not sent at all), the slot would keep the database's WAL for ever.
                self.client.update_applied_lsn(wal_end);
                Step::Nothing
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.committed
                    .extend(self.pending.drain(..).filter(|e| e.op != b'B'));
                self.through = Some(end_lsn);
                Step::Ready
            }
            _ => Step::Nothing,
        }
    }

    /// The committed changes received so far (taken), and the position to acknowledge once
    /// they are applied.
    pub(crate) fn ready(&mut self) -> (Vec<Entry>, Option<Lsn>) {
        (std::mem::take(&mut self.committed), self.through.take())
    }

    /// Everything up to `lsn` is applied: the server may let go of it.
    pub(crate) fn applied(&self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn);
    }
}

/// A writer's message: `op version key`.
fn parse(content: &[u8], at_ms: u64) -> Option<Entry> {
    let text = std::str::from_utf8(content).ok()?;
    let mut parts = text.splitn(3, ' ');
    let op = *parts.next()?.as_bytes().first()?;
    let version = parts.next()?.parse().ok()?;
    let key = parts.next()?.to_owned();
    matches!(op, b'I' | b'U' | b'D' | b'T').then_some(Entry {
        txid: u64::MAX,
        version,
        op,
        shared_missed: false,
        at_ms,
        key: Some(key),
    })
}

/// PostgreSQL's commit time (microseconds since 2000-01-01) in Unix milliseconds.
fn commit_ms(micros: i64) -> u64 {
    let since_2000 = u64::try_from(micros).unwrap_or(0) / 1000;
    POSTGRES_EPOCH * 1000 + since_2000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writers_message_is_an_entry() {
        let e = parse(b"U 42 alice smith", 7).unwrap();
        assert_eq!(
            (e.op, e.version, e.key.as_deref(), e.at_ms),
            (b'U', 42, Some("alice smith"), 7)
        );
        assert_eq!(parse(b"D 43 ", 0).unwrap().key.as_deref(), Some(""));
        assert!(parse(b"Z 1 k", 0).is_none());
        assert!(parse(b"U x k", 0).is_none());
        assert!(parse(&[0xff, 0x20], 0).is_none());
    }

    #[test]
    fn commit_times_count_from_2000() {
        assert_eq!(commit_ms(0), 946_684_800_000);
        assert_eq!(commit_ms(1_500_000), 946_684_801_500);
    }
}
