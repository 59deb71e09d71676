-- The database is the authority on versions, for every writer: this crate, psql, a migration,
-- another service. Every committed insert, update and delete of {table} gets a new version
-- from one sequence (so a key's versions never repeat and never go backwards, even across a
-- delete and a re-creation), is recorded in the change log {changes} and announced on the
-- channel {channel} (LISTEN/NOTIFY), which every instance's follower applies to its caches.
-- The names in braces are replaced by validated, quoted names when the migration runs (see
-- `PostgresTier::migrate`).

CREATE SEQUENCE IF NOT EXISTS {versions} AS bigint;

-- Upgrading a populated table: the next version is above every version already stored (and so
-- above every version a cache may hold).
SELECT setval('{versions}',
              GREATEST((SELECT COALESCE(max(version), 0) FROM {table}), 1),
              (SELECT COALESCE(max(version), 0) > 0 FROM {table}));

-- Without the trigger below a row would have no version: refuse it rather than store 0.
ALTER TABLE {table} ALTER COLUMN version SET DEFAULT 0;

CREATE TABLE IF NOT EXISTS {changes} (
    -- The order changes were recorded in (not always the order they committed in).
    position bigserial   PRIMARY KEY,
    key      text        NOT NULL,
    version  bigint      NOT NULL,
    -- I(nsert), U(pdate), D(elete), T(runcate: every key)
    op       text        NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    -- The writing transaction: a follower catches up by transaction, not by position, because
    -- positions are taken before commit and transactions commit out of order.
    txid     bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {changes_txid} ON {changes} (txid);
CREATE INDEX IF NOT EXISTS {changes_at} ON {changes} (at);

-- What pruning removed: a follower whose catch-up point is below `pruned_below` (a transaction
-- id) may have lost changes and flushes instead of catching up.
CREATE TABLE IF NOT EXISTS {feed} (
    id           int    PRIMARY KEY CHECK (id = 1),
    pruned_below bigint NOT NULL
);
INSERT INTO {feed} (id, pruned_below) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- Before a row is written: its version. An update that leaves the value as it is changes
-- nothing (no version, no log entry, no announcement).
CREATE OR REPLACE FUNCTION {stamp}() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.key = OLD.key AND NEW.value = OLD.value THEN
        RETURN NULL;
    END IF;
    NEW.version := nextval('{versions}');
    NEW.updated_at := now();
    RETURN NEW;
END
$body$;

-- After a row was written or deleted: the log entry and the announcement (delivered at commit,
-- in commit order). A key too long for a notification (8000 bytes) is announced without it;
-- the follower reads it from the log.
CREATE OR REPLACE FUNCTION {announce}() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    pos bigint;
    ver bigint;
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.key <> OLD.key) THEN
        ver := nextval('{versions}');
        INSERT INTO {changes} (key, version, op) VALUES (OLD.key, ver, 'D')
            RETURNING position INTO pos;
        PERFORM pg_notify('{channel}', pos || ' ' || ver || ' D '
            || CASE WHEN octet_length(OLD.key) < 7000 THEN OLD.key ELSE '' END);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO {changes} (key, version, op)
            VALUES (NEW.key, NEW.version, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END)
            RETURNING position INTO pos;
        PERFORM pg_notify('{channel}', pos || ' ' || NEW.version || ' '
            || CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END || ' '
            || CASE WHEN octet_length(NEW.key) < 7000 THEN NEW.key ELSE '' END);
    END IF;
    RETURN NULL;
END
$body$;

-- A TRUNCATE removes every key at once: one entry that tells followers to drop everything.
CREATE OR REPLACE FUNCTION {truncated}() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    pos bigint;
    ver bigint;
BEGIN
    ver := nextval('{versions}');
    INSERT INTO {changes} (key, version, op) VALUES ('', ver, 'T') RETURNING position INTO pos;
    PERFORM pg_notify('{channel}', pos || ' ' || ver || ' T ');
    RETURN NULL;
END
$body$;

DROP TRIGGER IF EXISTS tiercache_stamp ON {table};
CREATE TRIGGER tiercache_stamp BEFORE INSERT OR UPDATE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {stamp}();
DROP TRIGGER IF EXISTS tiercache_announce ON {table};
CREATE TRIGGER tiercache_announce AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {announce}();
DROP TRIGGER IF EXISTS tiercache_truncate ON {table};
CREATE TRIGGER tiercache_truncate AFTER TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {truncated}();

-- This crate's write: one round trip that checks the expected version (NULL: none), commits
-- nothing for an equal value, and reports what it did: ('W', new version), ('N', stored
-- version) for an unchanged value, ('C', stored version) for a conflict (0: nothing stored).
CREATE OR REPLACE FUNCTION {write_fn}(k text, v jsonb, expected bigint,
                                      OUT outcome text, OUT version bigint)
LANGUAGE plpgsql AS $body$
DECLARE
    cur_version bigint;
    cur_value jsonb;
BEGIN
    LOOP
        SELECT t.version, t.value INTO cur_version, cur_value
            FROM {table} t WHERE t.key = k FOR UPDATE;
        IF FOUND THEN
            IF expected IS NOT NULL AND expected <> cur_version THEN
                outcome := 'C'; version := cur_version; RETURN;
            END IF;
            IF cur_value = v THEN
                outcome := 'N'; version := cur_version; RETURN;
            END IF;
            UPDATE {table} t SET value = v WHERE t.key = k RETURNING t.version INTO version;
            outcome := 'W'; RETURN;
        END IF;
        IF expected IS NOT NULL AND expected <> 0 THEN
            outcome := 'C'; version := 0; RETURN;
        END IF;
        INSERT INTO {table} AS t (key, value) VALUES (k, v) ON CONFLICT (key) DO NOTHING
            RETURNING t.version INTO version;
        IF FOUND THEN
            outcome := 'W'; RETURN;
        END IF;
        -- Inserted by another transaction meanwhile: look again.
    END LOOP;
END
$body$;

-- This crate's delete, reporting like the write: ('D', the delete's version), ('N', 0) when
-- nothing was stored, ('C', stored version) for a conflict.
CREATE OR REPLACE FUNCTION {delete_fn}(k text, expected bigint,
                                       OUT outcome text, OUT version bigint)
LANGUAGE plpgsql AS $body$
DECLARE
    cur_version bigint;
BEGIN
    SELECT t.version INTO cur_version FROM {table} t WHERE t.key = k FOR UPDATE;
    IF NOT FOUND THEN
        IF expected IS NOT NULL AND expected <> 0 THEN
            outcome := 'C'; version := 0; RETURN;
        END IF;
        outcome := 'N'; version := 0; RETURN;
    END IF;
    IF expected IS NOT NULL AND expected <> cur_version THEN
        outcome := 'C'; version := cur_version; RETURN;
    END IF;
    DELETE FROM {table} t WHERE t.key = k;
    -- The trigger took the delete's version from the sequence, in this session.
    outcome := 'D'; version := currval('{versions}'); RETURN;
END
$body$;
