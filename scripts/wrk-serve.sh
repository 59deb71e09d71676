#!/usr/bin/env bash
# The rate one `userconfig serve` holds on a memory hit through GET, with authentication on,
# measured by wrk (Debian's package) at 64 connections from the same machine, in one run:
#   service token, access log on (the default, to a file)
#   service token, access log off (RUST_LOG=warn)
#   end-user JWT (HS256), access log on
# The database is an embedded SQLite file; the user read is in the memory tier after the first
# request. wrk and the service share the machine's cores: the figures are this machine's.
#
#   cargo build --release -p userconfig-cli && bash scripts/wrk-serve.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
bin=target/release/userconfig
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
[ -x "$bin" ] || { echo "build it first: cargo build --release -p userconfig-cli" >&2; exit 1; }
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT

out=$("$bin" token --name bench --scopes read,write --json)
token=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<<"$out")
python3 -c 'import json,sys; print(json.load(sys.stdin)["line"])' <<<"$out" > "$dir/tokens"
printf 'a shared secret of at least 32 bytes, for HS256' > "$dir/secret"
jwt=$(python3 - "$dir/secret" <<'EOF'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
secret = open(sys.argv[1], "rb").read()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "alice", "iss": "bench", "aud": "userconfig",
                       "exp": int(time.time()) + 3600}).encode())
sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
EOF
)

run() {
    local label="$1" filter="$2" credential="$3"
    RUST_LOG="$filter" DATABASE_URL="sqlite:$dir/db.sqlite3" "$bin" serve --listen 127.0.0.1:0 \
        --tokens-file "$dir/tokens" --jwt-secret-file "$dir/secret" \
        --jwt-issuer bench --jwt-audience userconfig \
        > "$dir/out" 2> "$dir/access.log" &
    local pid=$!
    for _ in $(seq 100); do grep -q listening "$dir/out" 2>/dev/null && break; sleep 0.1; done
    local url
    url="$(grep -o 'http://[0-9.:]*' "$dir/out")/v1/users/alice/config"
    curl -sf -X PUT -H "Authorization: Bearer $token" -d '{"preferences":{"theme":"dark"}}' \
        "$url" > /dev/null
    curl -sf -H "Authorization: Bearer $credential" "$url" > /dev/null
    echo "== $label"
    wrk -t2 -c64 -d"${secs}s" --latency -H "Authorization: Bearer $credential" "$url" \
        | grep -E 'Requests/sec|^ +(50|99)%|Non-2xx|Socket errors'
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

run "service token, access log on" "warn,access=info" "$token"
run "service token, access log off" "warn" "$token"
run "end-user JWT (HS256), access log on" "warn,access=info" "$jwt"
