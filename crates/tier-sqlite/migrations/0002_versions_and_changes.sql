-- The database is the authority on versions, for every writer (this crate, the sqlite3 shell,
-- another process): every committed insert, update and delete of {table} gets a new version
-- from one counter ({versions}), so a key's versions never repeat and never go backwards, even
-- across a delete and a re-creation; and is recorded in the change log {changes}, which every
-- instance's follower applies to its caches. SQLite commits one writer at a time, so the log's
-- positions are in commit order. The names in braces are replaced by validated, quoted names
-- when the migration runs (see `SqliteTier::migrate`).

-- Every statement may run twice: sqlx's migration lock does nothing on SQLite, so two
-- processes opening a new file may both apply this migration; the loser's transaction fails on
-- the bookkeeping row and rolls back (see `SqliteTier::migrate`), as long as nothing before
-- that fails otherwise.

-- The version column gets a default (the triggers set the real one), so that a plain
-- `INSERT INTO t (key, value)` works; SQLite changes a column only by rebuilding the table.
CREATE TABLE IF NOT EXISTS {rebuilt} (
    key        TEXT    PRIMARY KEY NOT NULL,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
INSERT INTO {rebuilt} (key, value, version, updated_at)
    SELECT key, value, version, updated_at FROM {table};
DROP TABLE {table};
ALTER TABLE {rebuilt} RENAME TO {table};

-- The last version given out. Upgrading a populated table: it starts at the greatest version
-- stored, so that the next write is above every version a cache may hold.
CREATE TABLE IF NOT EXISTS {versions} (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO {versions} (id, last) SELECT 1, COALESCE(max(version), 0) FROM {table};

CREATE TABLE IF NOT EXISTS {changes} (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    op       TEXT    NOT NULL CHECK (op IN ('I', 'U', 'D')),
    at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS {changes_at} ON {changes} (at);

-- What pruning removed: a follower whose position is below `pruned_through` may have lost
-- changes and empties its caches instead of catching up.
CREATE TABLE IF NOT EXISTS {feed} (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
);
INSERT OR IGNORE INTO {feed} (id, pruned_through) VALUES (1, 0);

CREATE TRIGGER IF NOT EXISTS {inserted} AFTER INSERT ON {table} BEGIN
    UPDATE {versions} SET last = last + 1;
    UPDATE {table} SET version = (SELECT last FROM {versions}),
                       updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
        WHERE key = NEW.key;
    INSERT INTO {changes} (key, version, op) SELECT NEW.key, last, 'I' FROM {versions};
END;

-- An update that leaves the value (as text) as it is changes nothing: no version, no entry.
CREATE TRIGGER IF NOT EXISTS {updated} AFTER UPDATE OF key, value ON {table}
WHEN NEW.value IS NOT OLD.value OR NEW.key IS NOT OLD.key BEGIN
    -- A renamed key: the old one is deleted.
    UPDATE {versions} SET last = last + 1 WHERE NEW.key IS NOT OLD.key;
    INSERT INTO {changes} (key, version, op)
        SELECT OLD.key, last, 'D' FROM {versions} WHERE NEW.key IS NOT OLD.key;
    UPDATE {versions} SET last = last + 1;
    UPDATE {table} SET version = (SELECT last FROM {versions}),
                       updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
        WHERE key = NEW.key;
    INSERT INTO {changes} (key, version, op) SELECT NEW.key, last, 'U' FROM {versions};
END;

CREATE TRIGGER IF NOT EXISTS {deleted} AFTER DELETE ON {table} BEGIN
    UPDATE {versions} SET last = last + 1;
    INSERT INTO {changes} (key, version, op) SELECT OLD.key, last, 'D' FROM {versions};
END;
