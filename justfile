# Mirrors CI (.ci/run): `just ci` before you push.

default: ci

# The main job on the embedded default (no servers needed).
run:
    cargo run --release -p userconfig-cli -- simulate

# The main job with its live dashboard at http://127.0.0.1:8080/.
watch:
    cargo run --release -p userconfig-cli -- simulate --serve 127.0.0.1:8080

# The HTTP service and its dashboard on http://127.0.0.1:8080/.
serve:
    cargo run --release -p userconfig-cli -- serve --listen 127.0.0.1:8080

# The workspace's rust-version against what its dependency tree needs.
rust-version:
    cargo metadata --format-version 1 --all-features | python3 .ci/rust-version.py

fmt:
    cargo fmt --all -- --check

clippy:
    cargo clippy --workspace --all-targets --all-features -- -D warnings

doc:
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

test:
    cargo test --workspace --all-features

bench:
    cargo bench --bench memory_hit

# The HTTP service's own overhead: a memory hit through GET against a bare axum handler.
bench-http:
    cargo bench -p userconfig-cli --bench http

# README's picture of the dashboard, from the browser test (needs Chromium).
screenshot:
    DASHBOARD_SCREENSHOT=docs/img/dashboard.png cargo test -p userconfig-cli --test browser

# Exactly what CI runs (lean-feature checks and the README's test command included).
ci:
    bash .ci/run

# Mutation testing of the core's and the memory tier's rule-bearing files (not in CI: over an
# hour on two cores). Results and the fast per-change subset: docs/testing.md.
mutants:
    MODEL_CASES=256 cargo mutants -p tiercache-core -p tiercache-memory \
        -f crates/core/src/entry.rs -f 'crates/core/src/chain/*.rs' \
        -f crates/core/src/breaker.rs -f crates/core/src/flight.rs \
        -f crates/tier-memory/src/lib.rs

# Each rule of the chain broken on purpose, with the test that must catch it (docs/testing.md).
rule-mutations:
    bash scripts/rule-mutations.sh
