-- The authoritative entries. `{table}` is replaced by the configured, schema-qualified,
-- validated table name when the migration runs (see `PostgresTier::migrate`).
CREATE TABLE IF NOT EXISTS {table} (
    key        text        PRIMARY KEY,
    value      jsonb       NOT NULL,
    version    bigint      NOT NULL CHECK (version > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
