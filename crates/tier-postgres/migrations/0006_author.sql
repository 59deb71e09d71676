-- Who made a change, for the history: a writer may name itself for one statement (a service
-- writing for one of its callers, `userconfig serve` for a token's name or an end user's
-- subject) with the write and delete functions below, which set `tiercache.author` for their
-- transaction only and call the functions of 0002. The trigger records that name, else the
-- session's application_name (`psql`, another service, `tiercache` for this crate).
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

-- As in 0005, the author now first from `tiercache.author`.
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
