#!/usr/bin/env bash
# What keeping history costs a writer, measured with pgbench at 16 clients on $DATABASE_URL
# (default: the local server's `test` database), in three scratch schemas dropped afterwards:
#   a: the version trigger and the change log entry (no history)
#   b: and a row in a history table of its own (what the migrations do)
#   c: the value and author in the change log entry instead, with a (key, version) index
# Each: a random key among 10,000, a 2 KiB configuration, `-T SECS` per run, ROUNDS rounds
# alternating. Usage: bash scripts/history-cost.sh [SECS] [ROUNDS]
set -euo pipefail
secs=${1:-12}
rounds=${2:-2}
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
dir=$(mktemp -d)
trap 'psql -q "$url" -c "DROP SCHEMA IF EXISTS hc_a, hc_b, hc_c CASCADE" >/dev/null 2>&1; rm -rf "$dir"' EXIT

for v in a b c; do cat >> "$dir/setup.sql" <<EOF
DROP SCHEMA IF EXISTS hc_$v CASCADE;
CREATE SCHEMA hc_$v;
CREATE SEQUENCE hc_$v.versions AS bigint;
CREATE TABLE hc_$v.t (key text PRIMARY KEY, value jsonb NOT NULL, version bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE hc_$v.changes (txid xid8 NOT NULL DEFAULT pg_current_xact_id(), version bigint NOT NULL,
  key text NOT NULL, op "char" NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),
  value jsonb, author text, PRIMARY KEY (txid, version));
CREATE TABLE hc_$v.history (key text NOT NULL, version bigint NOT NULL, value jsonb,
  at timestamptz NOT NULL DEFAULT clock_timestamp(), author text, PRIMARY KEY (key, version));
CREATE INDEX ON hc_$v.history USING brin (at);
CREATE FUNCTION hc_$v.stamp() RETURNS trigger LANGUAGE plpgsql AS \$b\$
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.key = OLD.key AND NEW.value = OLD.value THEN RETURN NULL; END IF;
  NEW.version := nextval('hc_$v.versions'); NEW.updated_at := now(); RETURN NEW;
END \$b\$;
CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON hc_$v.t FOR EACH ROW EXECUTE FUNCTION hc_$v.stamp();
EOF
done
cat >> "$dir/setup.sql" <<'EOF'
CREATE FUNCTION hc_a.announce() RETURNS trigger LANGUAGE plpgsql AS $b$
BEGIN
  INSERT INTO hc_a.changes (version, key, op) VALUES (NEW.version, NEW.key, 'U');
  RETURN NULL;
END $b$;
CREATE FUNCTION hc_b.announce() RETURNS trigger LANGUAGE plpgsql AS $b$
BEGIN
  INSERT INTO hc_b.changes (version, key, op) VALUES (NEW.version, NEW.key, 'U');
  INSERT INTO hc_b.history (key, version, value, author)
    VALUES (NEW.key, NEW.version, NEW.value, current_setting('application_name'));
  RETURN NULL;
END $b$;
CREATE FUNCTION hc_c.announce() RETURNS trigger LANGUAGE plpgsql AS $b$
BEGIN
  INSERT INTO hc_c.changes (version, key, op, value, author)
    VALUES (NEW.version, NEW.key, 'U', NEW.value, current_setting('application_name'));
  RETURN NULL;
END $b$;
CREATE INDEX ON hc_c.changes (key, version);
CREATE TRIGGER announce AFTER INSERT OR UPDATE ON hc_a.t FOR EACH ROW EXECUTE FUNCTION hc_a.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE ON hc_b.t FOR EACH ROW EXECUTE FUNCTION hc_b.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE ON hc_c.t FOR EACH ROW EXECUTE FUNCTION hc_c.announce();
EOF
psql -q "$url" -f "$dir/setup.sql" >/dev/null 2>&1
notes=$(printf 'x%.0s' $(seq 1800))
for v in a b c; do
  cat > "$dir/w_$v.sql" <<EOF
\set k random(1, 10000)
INSERT INTO hc_$v.t (key, value) VALUES ('u' || :k, jsonb_build_object('user_id', 'u' || :k,
  'preferences', jsonb_build_object('theme', 'dark', 'language', random()::text, 'notes', '$notes')))
  ON CONFLICT (key) DO UPDATE SET value = excluded.value;
EOF
done
for round in $(seq "$rounds"); do
  for v in a b c; do
    tps=$(pgbench "$url" -n -c 16 -j 2 -T "$secs" -f "$dir/w_$v.sql" 2>&1 | awk '/^tps/ {print $3; exit}')
    echo "round $round $v: $tps tps"
  done
done
