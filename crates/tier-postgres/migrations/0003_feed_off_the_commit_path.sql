-- The change feed leaves every writer's commit alone. The log trigger no longer NOTIFYs: a
-- NOTIFY takes a lock on the whole instance at commit and holds it across the WAL flush, so
-- every notifying transaction of every database commits one at a time. Followers find changes
-- in the log instead: one of them, elected, reads it and tells the others in short
-- transactions of its own that write nothing.
--
-- The log is rebuilt for that reader: one entry per committed change, keyed by the writing
-- transaction (epoch included, so it never wraps) and the change's version, which is all the
-- reader's cursor (a snapshot) needs; no other index to keep up on every write.

DROP TABLE IF EXISTS {changes};
CREATE TABLE {changes} (
    -- The writing transaction: a follower at a snapshot needs the entries of the transactions
    -- that were running or had not started then, however long another transaction stays open.
    txid    xid8        NOT NULL DEFAULT pg_current_xact_id(),
    version bigint      NOT NULL,
    key     text        NOT NULL,
    -- I(nsert), U(pdate), D(elete), T(runcate: every key)
    op      "char"      NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    -- When the change was written (its commit follows): the feed's lag is measured from it.
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (txid, version)
);

-- The feed's state, one row: where the elected follower is (the next one elected resumes
-- there), the cursors it held over time (a minute apart, for pruning: only what was visible a
-- whole retention ago is deleted), what was pruned (a follower whose cursor does not cover it
-- may have lost changes), and the history the cursor belongs to: the server's system
-- identifier and timeline, and the highest version seen (a failover, a restore or a version
-- counter set back shows as a change of these, and every cache is flushed once).
DROP TABLE IF EXISTS {feed};
CREATE TABLE {feed} (
    id         int    PRIMARY KEY CHECK (id = 1),
    cursor     text,
    history    jsonb  NOT NULL DEFAULT '[]',
    pruned     text,
    identity   text,
    high_water bigint NOT NULL DEFAULT 0
);
INSERT INTO {feed} (id) VALUES (1);

-- After a row was written or deleted: its log entry. Nothing else on the commit path.
CREATE OR REPLACE FUNCTION {announce}() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.key <> OLD.key) THEN
        INSERT INTO {changes} (version, key, op) VALUES (nextval('{versions}'), OLD.key, 'D');
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO {changes} (version, key, op)
            VALUES (NEW.version, NEW.key, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END);
    END IF;
    RETURN NULL;
END
$body$;

-- A TRUNCATE removes every key at once: one entry that tells followers to drop everything.
CREATE OR REPLACE FUNCTION {truncated}() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    INSERT INTO {changes} (version, key, op) VALUES (nextval('{versions}'), '', 'T');
    RETURN NULL;
END
$body$;
