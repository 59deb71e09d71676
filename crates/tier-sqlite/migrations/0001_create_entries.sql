-- The authoritative entries. `{table}` is replaced by the configured, validated table name
-- when the migration runs (see `SqliteTier::migrate`). `value` holds JSON text.
CREATE TABLE IF NOT EXISTS {table} (
    key        TEXT    PRIMARY KEY NOT NULL,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0),
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
