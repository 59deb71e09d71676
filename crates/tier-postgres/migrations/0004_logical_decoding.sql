-- Logical decoding, where the server allows it: while the elected follower decodes the WAL
-- through a replication slot, writers emit a transactional logical message instead of a log
-- entry (a WAL record, decoded at commit in commit order; nothing written to any table, no
-- lock, nothing that makes commits wait for each other).
--
-- Which of the two a writer does is a sequence's value (1: emit), not a column: a sequence is
-- read as it is now, whatever the reader's snapshot, so that a writer whose snapshot is older
-- than a change of the switch (a REPEATABLE READ transaction, or a statement that began just
-- before it) still does what the switch says when its trigger runs. The elected follower turns
-- it on only once its slot exists, and off when the stream cannot be had: then the
-- transactions running just after it turned it off are recorded in the feed row
-- (`flush_owed`; `{*}` while they are being recorded): one of them may have emitted a message
-- nobody will read, so every cache is flushed once more when they have all ended (see
-- feed/mode.rs). The snapshot of that second flush (`stream_off`) ends the era: a follower
-- whose cursor does not cover it may have missed a change that was never in the log, and
-- empties its local tiers when it catches up.
CREATE SEQUENCE IF NOT EXISTS {emit} MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;
ALTER TABLE {feed} ADD COLUMN IF NOT EXISTS flush_owed text[];
ALTER TABLE {feed} ADD COLUMN IF NOT EXISTS stream_off text;

-- After a row was written or deleted: its change recorded, as a log entry or as a logical
-- message (as the switch says). Nothing else on the commit path. It runs as the table's
-- owner (SECURITY DEFINER), so that a writer needs no privilege on the log or the switch;
-- every name in it is schema-qualified.
CREATE OR REPLACE FUNCTION {announce}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    logical boolean := (SELECT last_value = 1 FROM {emit});
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
    IF (SELECT last_value = 1 FROM {emit}) THEN
        PERFORM pg_logical_emit_message(true, '{channel}', 'T ' || version || ' ');
    ELSE
        INSERT INTO {changes} (version, key, op) VALUES (version, '', 'T');
    END IF;
    RETURN NULL;
END
$body$;
