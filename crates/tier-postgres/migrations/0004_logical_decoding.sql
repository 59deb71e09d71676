-- Logical decoding, where the server allows it: while the elected follower decodes the WAL
-- through a replication slot, writers emit a transactional logical message instead of a log
-- entry (a WAL record, decoded at commit in commit order; nothing written to any table, no
-- lock, nothing that makes commits wait for each other). The feed row says which: the
-- follower sets the flag only once its slot exists, and clears it when the stream cannot be
-- had. When it clears it, the transactions running then are recorded: one of them may have
-- emitted a message nobody will read, so every cache is flushed once more when they have all
-- ended (see feed/mode.rs).
ALTER TABLE {feed} ADD COLUMN IF NOT EXISTS logical boolean NOT NULL DEFAULT false;
ALTER TABLE {feed} ADD COLUMN IF NOT EXISTS flush_owed text[];

-- After a row was written or deleted: its change recorded, as a log entry or as a logical
-- message (as the feed row says). Nothing else on the commit path. It runs as the table's
-- owner (SECURITY DEFINER), so that a writer needs no privilege on the log or the feed row;
-- every name in it is schema-qualified.
CREATE OR REPLACE FUNCTION {announce}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    logical boolean := (SELECT f.logical FROM {feed} f WHERE f.id = 1);
    deleted bigint;
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.key <> OLD.key) THEN
        deleted := nextval('{versions}');
        IF logical THEN
            PERFORM pg_logical_emit_message(true, '{channel}', 'D ' || deleted || ' ' || OLD.key);
        ELSE
            INSERT INTO {changes} (version, key, op) VALUES (deleted, OLD.key, 'D');
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        IF logical THEN
            PERFORM pg_logical_emit_message(true, '{channel}',
                CASE TG_OP WHEN 'INSERT' THEN 'I ' ELSE 'U ' END || NEW.version || ' ' || NEW.key);
        ELSE
            INSERT INTO {changes} (version, key, op)
                VALUES (NEW.version, NEW.key, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END);
        END IF;
    END IF;
    RETURN NULL;
END
$body$;

-- A TRUNCATE removes every key at once: one change that tells followers to drop everything.
CREATE OR REPLACE FUNCTION {truncated}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    version bigint := nextval('{versions}');
BEGIN
    IF (SELECT f.logical FROM {feed} f WHERE f.id = 1) THEN
        PERFORM pg_logical_emit_message(true, '{channel}', 'T ' || version || ' ');
    ELSE
        INSERT INTO {changes} (version, key, op) VALUES (version, '', 'T');
    END IF;
    RETURN NULL;
END
$body$;
