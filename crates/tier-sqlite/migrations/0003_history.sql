-- Past versions of every key, for history, reading a version back and rollback: one row per
-- committed change, by any writer, with the value it stored (NULL for a delete) and when. The
-- triggers that give versions and log changes now also write the history row, in the same
-- statement's transaction.
CREATE TABLE IF NOT EXISTS {history} (
    key     TEXT    NOT NULL,
    version INTEGER NOT NULL,
    value   TEXT,
    at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (key, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {history_at} ON {history} (at);

DROP TRIGGER IF EXISTS {inserted};
CREATE TRIGGER {inserted} AFTER INSERT ON {table} BEGIN
    UPDATE {versions} SET last = last + 1;
    UPDATE {table} SET version = (SELECT last FROM {versions}),
                       updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
        WHERE key = NEW.key;
    INSERT INTO {changes} (key, version, op) SELECT NEW.key, last, 'I' FROM {versions};
    INSERT INTO {history} (key, version, value) SELECT NEW.key, last, NEW.value FROM {versions};
END;

-- An update that leaves the value (as text) as it is changes nothing: no version, no entry.
DROP TRIGGER IF EXISTS {updated};
CREATE TRIGGER {updated} AFTER UPDATE OF key, value ON {table}
WHEN NEW.value IS NOT OLD.value OR NEW.key IS NOT OLD.key BEGIN
    -- A renamed key: the old one is deleted.
    UPDATE {versions} SET last = last + 1 WHERE NEW.key IS NOT OLD.key;
    INSERT INTO {changes} (key, version, op)
        SELECT OLD.key, last, 'D' FROM {versions} WHERE NEW.key IS NOT OLD.key;
    INSERT INTO {history} (key, version, value)
        SELECT OLD.key, last, NULL FROM {versions} WHERE NEW.key IS NOT OLD.key;
    UPDATE {versions} SET last = last + 1;
    UPDATE {table} SET version = (SELECT last FROM {versions}),
                       updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
        WHERE key = NEW.key;
    INSERT INTO {changes} (key, version, op) SELECT NEW.key, last, 'U' FROM {versions};
    INSERT INTO {history} (key, version, value) SELECT NEW.key, last, NEW.value FROM {versions};
END;

DROP TRIGGER IF EXISTS {deleted};
CREATE TRIGGER {deleted} AFTER DELETE ON {table} BEGIN
    UPDATE {versions} SET last = last + 1;
    INSERT INTO {changes} (key, version, op) SELECT OLD.key, last, 'D' FROM {versions};
    INSERT INTO {history} (key, version, value) SELECT OLD.key, last, NULL FROM {versions};
END;
