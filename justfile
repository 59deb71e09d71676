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
