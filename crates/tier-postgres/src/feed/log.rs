//! The change log as the feed reads it: the changes a cursor has not seen, in bounded pages;
//! the feed row (the elected follower's cursor, its history, what was pruned); pruning in
//! bounded batches. Every statement is one round trip on the follower's own connection, in no
//! transaction of its own: nothing is held open between them.

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};

use super::snapshot::{Snapshot, Xid};
use super::wire::Entry;
use crate::migrate::Names;

/// Entries read per statement.
pub(crate) const PAGE: i64 = 500;
/// Entries deleted per statement when pruning.
pub(crate) const PRUNE_BATCH: i64 = 1000;

/// The statements, with the table's names filled in.
pub(crate) struct Statements {
    /// `$1` cursor, `$2` target snapshot (NULL: this statement's own), `$3`/`$4` the last
    /// entry read (txid, version), `$5` page size, `$6`/`$7` where the entries of the
    /// transactions that began after the cursor start. Returns one row at least: the
    /// statement's snapshot and what was pruned, then each entry (NULL columns when there is
    /// none).
    page: String,
    /// `$1` txid, `$2` version: the key of one entry.
    key_of: String,
    /// The feed row.
    state: String,
    /// `$1` the elected follower's cursor, `$2` the highest version it saw, `$3` the history
    /// they belong to.
    save_cursor: String,
    /// The server's history (system identifier and timeline) and whether it is a standby.
    identity: String,
    /// `$1`: the version counter's next value, at least.
    raise_versions: String,
    /// `$1`: the switch's new value (1: writers emit logical messages, 0: they write the log).
    set_switch: String,
    /// A flush is owed, for transactions not yet recorded (`{*}`).
    owe: String,
    /// The transactions running now are those the flush owed waits for (replacing `{*}`).
    owe_running: String,
    /// Whether writers emit logical messages.
    logical: String,
    /// `$1`: the flush owed that was made (it is no longer owed, unless owed anew).
    flushed: String,
    /// `$1` the history (jsonb).
    save_history: String,
    /// `$1` the cursor pruned through, `$2` batch size: records it, deletes a batch of the
    /// entries it saw, returns how many.
    prune: String,
    /// `$1` the retention in seconds, `$2` batch size: deletes a batch of past versions older
    /// than the retention (found through the time's BRIN index).
    prune_history: String,
}

impl Statements {
    pub(crate) fn new(names: &Names) -> Self {
        // Entries not seen at the cursor: its transactions in progress, and those that began
        // after it, both through the primary key. Each branch starts after the last entry read
        // (`$3`, `$4`); the second one from `$6`, `$7`, the later of that and the cursor's
        // `xmax`, as one row comparison: the index scan then starts there, instead of at the
        // first entry with a filter on the rest. The second page on is limited to what the first
        // page's snapshot saw (a later transaction is the next read's).
        let visible = "($2::pg_snapshot IS NULL OR pg_visible_in_snapshot(txid, $2::pg_snapshot))";
        let page = names.fill(&format!(
            "SELECT pg_current_snapshot()::text, f.pruned, \
                    c.txid::text, c.version, c.key, c.op::text, \
                    (extract(epoch FROM c.at) * 1000)::float8, \
                    (SELECT last_value FROM {{versions}}), \
                    (SELECT last_value = 1 FROM {{emit}}), f.flush_owed, f.stream_off \
             FROM {{feed}} f LEFT JOIN LATERAL ( \
               SELECT * FROM ( \
                 (SELECT txid, version, key, op, at FROM {{changes}} \
                  WHERE txid = ANY(ARRAY(SELECT pg_snapshot_xip($1::pg_snapshot))) \
                    AND (txid, version) > ($3::xid8, $4) AND {visible} \
                  ORDER BY txid, version LIMIT $5) \
                 UNION ALL \
                 (SELECT txid, version, key, op, at FROM {{changes}} \
                  WHERE (txid, version) > ($6::xid8, $7) AND {visible} \
                  ORDER BY txid, version LIMIT $5) \
               ) u ORDER BY txid, version LIMIT $5 \
             ) c ON true WHERE f.id = 1"
        ));
        Statements {
            page,
            key_of: names.fill("SELECT key FROM {changes} WHERE txid = $1::xid8 AND version = $2"),
            state: names.fill(
                "SELECT cursor, history::text, identity, high_water, \
                        (SELECT last_value FROM {versions}), pg_current_snapshot()::text \
                 FROM {feed} WHERE id = 1",
            ),
            save_cursor: names.fill(
                "UPDATE {feed} SET cursor = $1, high_water = GREATEST(high_water, $2), \
                 identity = $3 WHERE id = 1",
            ),
            // The timeline from the WAL being written (the last checkpoint's lags a promotion);
            // a standby writes none, and says it is in recovery.
            identity: "SELECT s.system_identifier::text || ':' || CASE WHEN pg_is_in_recovery() \
                       THEN '' ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, \
                       pg_is_in_recovery() \
                       FROM pg_control_system() s"
                .to_owned(),
            set_switch: names.fill("SELECT setval('{emit}', $1, true)"),
            owe: names.fill("UPDATE {feed} SET flush_owed = '{*}' WHERE id = 1"),
            owe_running: names.fill(
                "UPDATE {feed} SET flush_owed = \
                   ARRAY(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x) \
                 WHERE id = 1 AND flush_owed = '{*}'",
            ),
            logical: names.fill("SELECT last_value = 1 FROM {emit}"),
            flushed: names.fill(
                "UPDATE {feed} SET flush_owed = NULL, stream_off = pg_current_snapshot()::text \
                 WHERE id = 1 AND flush_owed = $1::text[]",
            ),
            raise_versions: names.fill(
                "SELECT setval('{versions}', GREATEST($1, (SELECT last_value FROM {versions})))",
            ),
            save_history: names.fill("UPDATE {feed} SET history = $1::jsonb WHERE id = 1"),
            prune_history: names.fill(
                "DELETE FROM {history} WHERE ctid = ANY(ARRAY( \
                   SELECT ctid FROM {history} \
                   WHERE at < clock_timestamp() - make_interval(secs => $1) LIMIT $2))",
            ),
            prune: names.fill(
                "WITH raised AS (UPDATE {feed} SET pruned = $1 WHERE id = 1 RETURNING 1), \
                 victims AS (SELECT txid, version FROM {changes} \
                   WHERE txid < pg_snapshot_xmax($1::pg_snapshot) \
                     AND pg_visible_in_snapshot(txid, $1::pg_snapshot) \
                   ORDER BY txid, version LIMIT $2), \
                 gone AS (DELETE FROM {changes} c USING victims v \
                   WHERE c.txid = v.txid AND c.version = v.version RETURNING 1) \
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM raised)",
            ),
        }
    }
}

/// What one read of the log found.
pub(crate) struct Read {
    /// The snapshot the read saw the log in: the cursor once every page is applied.
    pub(crate) seen: Snapshot,
    /// What pruning removed (everything visible in it, at most).
    pub(crate) pruned: Option<Snapshot>,
    /// The version counter's last value when the read ran.
    pub(crate) last_version: u64,
    /// Whether writers emit logical messages (their changes are not in the log).
    pub(crate) logical: bool,
    /// Writers stopped emitting messages, and every cache is to be flushed (once more) when
    /// these transactions, which ran then, have ended.
    pub(crate) flush_owed: Option<Vec<String>>,
    /// When the last era of logical messages ended (its second flush was made).
    pub(crate) stream_off: Option<Snapshot>,
    pub(crate) entries: Vec<Entry>,
    /// Whether more pages follow.
    pub(crate) more: bool,
}

/// Reads one page of the entries not visible at `cursor`: the first page (`target` `None`)
/// in the statement's own snapshot, the next ones limited to `target` (the first page's),
/// after the last entry read.
pub(crate) async fn page(
    conn: &mut PgConnection,
    sql: &Statements,
    cursor: &Snapshot,
    target: Option<&Snapshot>,
    after: (Xid, u64),
) -> Result<Read, sqlx::Error> {
    let after = (after.0, i64::try_from(after.1).unwrap_or(i64::MAX));
    // `(txid, version) > (xmax - 1, MAX)` is `txid >= xmax`.
    let later = after.max((cursor.xmax().saturating_sub(1), i64::MAX));
    let rows = sqlx::query(AssertSqlSafe(sql.page.as_str()))
        .bind(cursor.to_string())
        .bind(target.map(ToString::to_string))
        .bind(after.0.to_string())
        .bind(after.1)
        .bind(PAGE)
        .bind(later.0.to_string())
        .bind(later.1)
        .fetch_all(conn)
        .await?;
    let mut seen = None;
    let mut pruned = None;
    let mut last_version = 0;
    let mut logical = false;
    let mut flush_owed = None;
    let mut stream_off = None;
    let mut entries = Vec::with_capacity(rows.len());
    for row in &rows {
        let snap: String = row.try_get(0)?;
        seen = Snapshot::parse(&snap);
        let p: Option<String> = row.try_get(1)?;
        pruned = p.as_deref().and_then(Snapshot::parse);
        let last: i64 = row.try_get(7)?;
        last_version = u64::try_from(last).unwrap_or(0);
        logical = row.try_get(8)?;
        flush_owed = row.try_get(9)?;
        let off: Option<String> = row.try_get(10)?;
        stream_off = off.as_deref().and_then(Snapshot::parse);
        let Some(txid) = row.try_get::<Option<String>, _>(2)? else {
            continue;
        };
        let version: i64 = row.try_get(3)?;
        let key: String = row.try_get(4)?;
        let op: String = row.try_get(5)?;
        let at_ms: f64 = row.try_get(6)?;
        entries.push(Entry {
            txid: txid.parse().map_err(|_| protocol("a transaction id"))?,
            version: u64::try_from(version).map_err(|_| protocol("a version"))?,
            op: *op.as_bytes().first().ok_or_else(|| protocol("an op"))?,
            shared_missed: false,
            // Whole milliseconds since the epoch, well within f64's exact integers.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            at_ms: at_ms.max(0.0) as u64,
            key: Some(key),
        });
    }
    let seen = seen.ok_or_else(|| protocol("the snapshot"))?;
    let more = entries.len() as i64 == PAGE;
    Ok(Read {
        seen,
        pruned,
        last_version,
        logical,
        flush_owed,
        stream_off,
        entries,
        more,
    })
}

/// The key of one entry (one too long to carry in a notification); `None` once pruned.
pub(crate) async fn key_of(
    conn: &mut PgConnection,
    sql: &Statements,
    txid: Xid,
    version: u64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(sql.key_of.as_str()))
        .bind(txid.to_string())
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .fetch_optional(conn)
        .await
}

/// The feed row.
pub(crate) struct State {
    /// Where the last elected follower got to.
    pub(crate) cursor: Option<Snapshot>,
    /// The history that cursor belongs to (system identifier and timeline).
    pub(crate) identity: Option<String>,
    /// The highest version the elected followers saw.
    pub(crate) high_water: u64,
    /// The version counter's last value now.
    pub(crate) last_version: u64,
    /// A snapshot taken now.
    pub(crate) now: Snapshot,
    /// Its cursors over time (milliseconds since the epoch), a minute or so apart, oldest
    /// first.
    pub(crate) history: Vec<(u64, Snapshot)>,
}

pub(crate) async fn state(conn: &mut PgConnection, sql: &Statements) -> Result<State, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(sql.state.as_str()))
        .fetch_one(conn)
        .await?;
    let cursor: Option<String> = row.try_get(0)?;
    let history: String = row.try_get(1)?;
    let identity: Option<String> = row.try_get(2)?;
    let high_water: i64 = row.try_get(3)?;
    let last_version: i64 = row.try_get(4)?;
    let now: String = row.try_get(5)?;
    let history: Vec<(u64, String)> = serde_json::from_str(&history).unwrap_or_default();
    Ok(State {
        cursor: cursor.as_deref().and_then(Snapshot::parse),
        identity,
        high_water: u64::try_from(high_water).unwrap_or(0),
        last_version: u64::try_from(last_version).unwrap_or(0),
        now: Snapshot::parse(&now).ok_or_else(|| protocol("the snapshot"))?,
        history: history
            .into_iter()
            .filter_map(|(at, s)| Some((at, Snapshot::parse(&s)?)))
            .collect(),
    })
}

pub(crate) async fn save_cursor(
    conn: &mut PgConnection,
    sql: &Statements,
    cursor: &Snapshot,
    high_water: u64,
    identity: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql.save_cursor.as_str()))
        .bind(cursor.to_string())
        .bind(i64::try_from(high_water).unwrap_or(i64::MAX))
        .bind(identity)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets whether writers emit logical messages (`on`) or write the log; returns what it was.
/// Turning it off owes a flush for the transactions that run just after (one of them may
/// have emitted a message before, and commit after the flush that goes with the change): the
/// debt is recorded before the switch turns (`{*}`), and its transactions just after, each in
/// a statement of its own (a statement's snapshot is taken when it starts), so that a follower
/// gone in between leaves a debt the next one elected settles ([`owe_running`]).
pub(crate) async fn set_logical(
    conn: &mut PgConnection,
    sql: &Statements,
    on: bool,
) -> Result<bool, sqlx::Error> {
    let was = logical(&mut *conn, sql).await?;
    if was == on {
        return Ok(was);
    }
    if !on {
        sqlx::query(AssertSqlSafe(sql.owe.as_str()))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(AssertSqlSafe(sql.set_switch.as_str()))
        .bind(i64::from(on))
        .execute(&mut *conn)
        .await?;
    if !on {
        owe_running(conn, sql).await?;
    }
    Ok(was)
}

/// Records the transactions running now as those a flush owed (`{*}`) waits for.
pub(crate) async fn owe_running(
    conn: &mut PgConnection,
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql.owe_running.as_str()))
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether writers emit logical messages now.
pub(crate) async fn logical(
    conn: &mut PgConnection,
    sql: &Statements,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(AssertSqlSafe(sql.logical.as_str()))
        .fetch_one(conn)
        .await
}

/// Whether any of these transactions still runs.
pub(crate) async fn still_running(
    conn: &mut PgConnection,
    xids: &[String],
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) x \
                        WHERE pg_xact_status(x::xid8) = 'in progress')",
    )
    .bind(xids)
    .fetch_one(conn)
    .await
}

/// The flush owed (`xids`) was made.
pub(crate) async fn flushed(
    conn: &mut PgConnection,
    sql: &Statements,
    xids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql.flushed.as_str()))
        .bind(xids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Drops this feed's replication slot if there is one and nothing reads it (it would keep
/// the server's WAL for nobody).
pub(crate) async fn drop_slot(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = $1 AND database = current_database() AND NOT active",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// The server's history (`system identifier:timeline`) and whether it is in recovery (a
/// standby).
pub(crate) async fn identity(
    conn: &mut PgConnection,
    sql: &Statements,
) -> Result<(String, bool), sqlx::Error> {
    sqlx::query_as(AssertSqlSafe(sql.identity.as_str()))
        .fetch_one(conn)
        .await
}

/// Sets the version counter to at least `next` (the versions of a history the server no
/// longer has may still be in caches somewhere: the next ones must pass them).
pub(crate) async fn raise_versions(
    conn: &mut PgConnection,
    sql: &Statements,
    next: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql.raise_versions.as_str()))
        .bind(i64::try_from(next).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds `cursor` to the history at `now` (milliseconds since the epoch) and keeps what pruning may
/// still need: every entry newer than the retention, and the newest one older.
pub(crate) async fn record_history(
    conn: &mut PgConnection,
    sql: &Statements,
    mut history: Vec<(u64, Snapshot)>,
    now: u64,
    cursor: Snapshot,
    retention: Duration,
) -> Result<Vec<(u64, Snapshot)>, sqlx::Error> {
    history.push((now, cursor));
    let cutoff = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    let old = history.iter().filter(|(at, _)| *at <= cutoff).count();
    if old > 1 {
        history.drain(..old - 1);
    }
    let json: Vec<(u64, String)> = history.iter().map(|(at, s)| (*at, s.to_string())).collect();
    sqlx::query(AssertSqlSafe(sql.save_history.as_str()))
        .bind(serde_json::to_string(&json).expect("plain data"))
        .execute(conn)
        .await?;
    Ok(history)
}

/// The cursor pruning may delete through at `now`: the newest one held at least a retention
/// ago (every follower cut off for less than the retention has seen all it covers).
pub(crate) fn prunable(
    history: &[(u64, Snapshot)],
    now: u64,
    retention: Duration,
) -> Option<&Snapshot> {
    let cutoff = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
    history
        .iter()
        .rev()
        .find(|(at, _)| *at <= cutoff)
        .map(|(_, s)| s)
}

/// Deletes, in batches, the entries visible at `through`, having recorded it as pruned (in
/// the same statement as each batch, so that a follower never finds an entry gone without
/// knowing). Stops after `budget`; returns how many it deleted.
pub(crate) async fn prune(
    conn: &mut PgConnection,
    sql: &Statements,
    through: &Snapshot,
    budget: Duration,
) -> Result<u64, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut deleted = 0u64;
    loop {
        let (gone, _): (i64, i64) = sqlx::query_as(AssertSqlSafe(sql.prune.as_str()))
            .bind(through.to_string())
            .bind(PRUNE_BATCH)
            .fetch_one(&mut *conn)
            .await?;
        deleted += u64::try_from(gone).unwrap_or(0);
        if gone < PRUNE_BATCH || started.elapsed() >= budget {
            return Ok(deleted);
        }
    }
}

/// Deletes, in batches, the past versions older than `retention`. Stops after `budget`;
/// returns how many it deleted.
pub(crate) async fn prune_history(
    conn: &mut PgConnection,
    sql: &Statements,
    retention: Duration,
    budget: Duration,
) -> Result<u64, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut deleted = 0u64;
    loop {
        let gone = sqlx::query(AssertSqlSafe(sql.prune_history.as_str()))
            .bind(retention.as_secs_f64())
            .bind(PRUNE_BATCH)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        deleted += gone;
        if gone < PRUNE_BATCH as u64 || started.elapsed() >= budget {
            return Ok(deleted);
        }
    }
}

fn protocol(what: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "the change log returned {what} this version cannot read"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_goes_through_the_newest_cursor_a_retention_old() {
        let s = |t: &str| Snapshot::parse(t).unwrap();
        let history = vec![(100, s("1:2:")), (160, s("3:4:")), (220, s("5:6:"))];
        let hour = Duration::from_millis(100);
        assert_eq!(prunable(&history, 199, hour), None);
        assert_eq!(prunable(&history, 200, hour), Some(&s("1:2:")));
        assert_eq!(prunable(&history, 300, hour), Some(&s("3:4:")));
        assert_eq!(prunable(&history, 10_000, hour), Some(&s("5:6:")));
    }
}
