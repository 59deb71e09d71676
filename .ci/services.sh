#!/usr/bin/env bash
# Makes sure what the tests need is on this machine and running: the OpenSSL headers for
# native-tls, a Redis at 127.0.0.1:6379 and a PostgreSQL at 127.0.0.1:5432 that trusts local
# connections and has a `test` database. Installs with apt-get only what is missing.
set -euo pipefail

apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing $*, and no apt-get to install it" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # wait_for <what> <command...>
  local what=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "$what did not come up" >&2
  return 1
}

ensure_build_deps() {
  if ! dpkg -s libssl-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null 2>&1; then
    echo "installing libssl-dev and pkg-config (for native-tls)"
    apt_install libssl-dev pkg-config
  fi
  if ! command -v openssl >/dev/null 2>&1; then
    echo "installing openssl (the TLS test makes its certificates with it)"
    apt_install openssl
  fi
}

ensure_redis() {
  # Tests start servers of their own (a cluster, one to pause): the binary must be here even
  # when something already answers on 6379.
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server"
    apt_install redis-server redis-tools
  fi
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return 0; fi
  echo "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for "Redis" redis-cli -h 127.0.0.1 -p 6379 ping
}

pg_ok() {
  psql -h 127.0.0.1 -p 5432 -U postgres -d test -tAc 'select 1' 2>/dev/null | grep -q 1
}

ensure_postgres() {
  if pg_ok; then return 0; fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "installing postgresql"
    apt_install postgresql postgresql-client
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    echo "starting postgresql $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for "PostgreSQL" pg_isready -h 127.0.0.1 -p 5432
  fi
  if ! pg_ok; then
    # A fresh install asks local TCP clients for a password: trust them, and add `test`.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      su postgres -c "psql -qc 'select pg_reload_conf()'" >/dev/null
    fi
    su postgres -c "psql -tAc \"select 1 from pg_database where datname='test'\"" | grep -q 1 ||
      su postgres -c "createdb test"
    wait_for "PostgreSQL (test database)" pg_ok
  fi
}

ensure_chromium() {
  # The dashboard's browser test (crates/cli/tests/browser.rs) drives Debian's Chromium.
  if command -v chromium >/dev/null 2>&1; then return 0; fi
  echo "installing chromium"
  apt_install --no-install-recommends chromium || echo "chromium could not be installed" >&2
}

ensure_schemathesis() {
  # The OpenAPI contract's fuzzing (crates/cli/tests/openapi.rs) runs schemathesis, from PyPI.
  if command -v schemathesis >/dev/null 2>&1; then return 0; fi
  echo "installing schemathesis"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore schemathesis \
    || echo "schemathesis could not be installed" >&2
}

ensure_build_deps
ensure_redis
ensure_postgres
ensure_chromium
ensure_schemathesis
