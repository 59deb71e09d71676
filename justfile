# Mirrors CI (.ci/run): `just ci` before you push.

default: ci

# The main job on the embedded default (no servers needed).
run:
    cargo run --release -p userconfig-cli -- simulate

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

ci: fmt clippy doc test

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
