-- Past versions of every key, for history, reading a version back and rollback: one row per
-- committed change, by any writer, with the value it stored (NULL for a delete), when, and
-- who (below). Written by the same trigger as the change log (or
-- the logical message), in the writer's transaction: one more insert, no lock, nothing that
-- makes commits wait for each other. A table of its own rather than a value column in the
-- change log: the log is the feed's (pruned after an hour, absent when the feed streams the
-- WAL), the history is kept for its own retention; and measured with pgbench at 16 clients,
-- the two cost writers the same within noise (docs/performance.md).
--
-- The primary key serves reading a key's versions, newest first; a BRIN index on the time
-- (rows arrive in time order, so it costs writers next to nothing) serves pruning.
CREATE TABLE IF NOT EXISTS {history} (
    key     text        NOT NULL,
    version bigint      NOT NULL,
    value   jsonb,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    author  text,
    PRIMARY KEY (key, version)
);
CREATE INDEX IF NOT EXISTS {history_at} ON {history} USING brin (at);

-- Who made a change: a writer may name itself for one statement (a service writing for one of
-- its callers, `userconfig serve` for a token's name or an end user's subject) with these write
-- and delete functions, which set `tiercache.author` for their transaction only and call the
-- functions of 0002. The trigger below records that name, else the session's application_name
-- (`psql`, another service, `tiercache` for this crate).
CREATE OR REPLACE FUNCTION {write_by_fn}(k text, v jsonb, expected bigint, author text,
                                         OUT outcome text, OUT version bigint)
LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM set_config('tiercache.author', coalesce(author, ''), true);
    SELECT w.outcome, w.version INTO outcome, version FROM {write_fn}(k, v, expected) w;
END
$body$;

CREATE OR REPLACE FUNCTION {delete_by_fn}(k text, expected bigint, author text,
                                          OUT outcome text, OUT version bigint)
LANGUAGE plpgsql AS $body$
BEGIN
    PERFORM set_config('tiercache.author', coalesce(author, ''), true);
    SELECT d.outcome, d.version INTO outcome, version FROM {delete_fn}(k, expected) d;
END
$body$;

-- The log entry (or the logical message), and now the history row. Nothing else on the commit
-- path. SECURITY DEFINER: a writer needs no privilege on the log, the history or the switch.
CREATE OR REPLACE FUNCTION {announce}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    logical boolean := (SELECT last_value = 1 FROM {emit});
    author text := coalesce(nullif(current_setting('tiercache.author', true), ''),
                            nullif(current_setting('application_name', true), ''));
    deleted bigint;
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.key <> OLD.key) THEN
        deleted := nextval('{versions}');
        IF logical THEN
            PERFORM pg_logical_emit_message(true, '{channel}', 'D ' || deleted || ' ' || OLD.key);
        ELSE
            INSERT INTO {changes} (version, key, op) VALUES (deleted, OLD.key, 'D');
        END IF;
        INSERT INTO {history} (key, version, value, author) VALUES (OLD.key, deleted, NULL, author);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        IF logical THEN
            PERFORM pg_logical_emit_message(true, '{channel}',
                CASE TG_OP WHEN 'INSERT' THEN 'I ' ELSE 'U ' END || NEW.version || ' ' || NEW.key);
        ELSE
            INSERT INTO {changes} (version, key, op)
                VALUES (NEW.version, NEW.key, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END);
        END IF;
        INSERT INTO {history} (key, version, value, author)
            VALUES (NEW.key, NEW.version, NEW.value, author);
    END IF;
    RETURN NULL;
END
$body$;
