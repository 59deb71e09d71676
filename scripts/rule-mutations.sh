#!/usr/bin/env bash
# Breaks each rule of the chain on purpose, one at a time, and checks that the test named for it
# fails: the model test (tests/model/) for the rules it exists for, the targeted tests for the
# rest. Run from the repository root on a clean work tree:
#
#     bash scripts/rule-mutations.sh            # every mutation
#     bash scripts/rule-mutations.sh floors     # one of them
#     bash scripts/rule-mutations.sh --check    # only that every mutation still applies (CI)
#
# Each mutation is a literal replacement in one file, checked to have applied, then undone with
# `git checkout` whatever happens. Prints one line per mutation: CAUGHT or MISSED. The exit
# status is the number missed. Takes up to a minute per mutation (the model's 512 cases).
# docs/testing.md says which test catches which mutation, and why the model alone cannot
# catch some.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! git diff --quiet -- crates; then
    echo "crates/ has uncommitted changes: commit or stash them first" >&2
    exit 100
fi

# name | test target | file | text | replacement (a literal `|` is written `\|`)
mutations=(
    "version-rule|model|crates/core/src/entry.rs|Slot::Live(entry) => version >= entry.version,|Slot::Live(_) => true,"
    "tombstones|model|crates/core/src/entry.rs|Some(Slot::Tombstone { version: v, until })|{ let _ = (v, until); None }"
    "manual-tombstones|model|crates/core/src/entry.rs|entry.version.checked_sub(1).map(\|below\| Slot::Tombstone {|entry.version.checked_sub(1).filter(\|_\| false).map(\|below\| Slot::Tombstone {"
    "invalidation-epoch|model|crates/core/src/chain/marks.rs|Some(m) if m.blind_at > ticket => Verdict::Suspect,|"
    "manual-invalidation|model|crates/core/src/chain/invalidate.rs|async move { this.invalidate_everywhere(&key, None).await }|async move { let _ = (this, key); Ok(()) }"
    "bottom-first|model|crates/core/src/chain/steps.rs|for i in (0..inner.tiers.len()).rev() {|for i in 0..inner.tiers.len() {"
    "version-marks|chain_write|crates/core/src/chain/marks.rs|Some(m) if version < m.version => Verdict::Older,|"
    "floors|rules|crates/core/src/chain/floors.rs|self.len.load(Ordering::Relaxed) == 0 \|\| self.check(key, version, clock)|{ let _ = (key, version, clock); true }"
    "floor-life|rules|crates/core/src/chain/steps.rs|let life = inner.policy.floor_ttl + inner.policy.max_stale.unwrap_or(Duration::ZERO);|let life = inner.policy.floor_ttl;"
    "max-stale-boundary|rules|crates/tier-memory/src/lib.rs|now.saturating_since(at) <= max_stale|now.saturating_since(at) < max_stale"
    "fill-take-back|rules|crates/core/src/chain/steps.rs|self.take_back(index, key, verdict, entry.version).await;|let _ = verdict;"
    "builder-floor-ttl|rules|crates/core/src/chain/builder.rs|if self.policy.floor_ttl.is_zero() {|if self.policy.floor_ttl.is_zero() && false {"
    "clear-second-pass|chain_write|crates/core/src/chain/invalidate.rs|if let Err(error) = this.clear_pass(index).await {|if let Err(error) = async { Ok::<(), Error>(()) }.await {"
)

check_only=false
if [[ "${1:-}" == "--check" ]]; then
    check_only=true
    shift
fi

missed=0
for m in "${mutations[@]}"; do
    IFS='|' read -r name target file from to <<<"$(sed 's/\\|/\x01/g' <<<"$m")"
    from=${from//$'\x01'/|}
    to=${to//$'\x01'/|}
    if [[ $# -gt 0 && " $* " != *" $name "* ]]; then
        continue
    fi
    FROM="$from" TO="$to" perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$file"
    if git diff --quiet -- "$file"; then
        echo "$name: the text to replace is not in $file (update this script)" >&2
        missed=$((missed + 1))
        continue
    fi
    if $check_only; then
        git checkout -q -- "$file"
        continue
    fi
    log="/tmp/rule-mutation-$name.log"
    if cargo test -q --test "$target" >"$log" 2>&1; then
        echo "$name: MISSED (--test $target passed; log $log)"
        missed=$((missed + 1))
    elif grep -q "could not compile" "$log"; then
        echo "$name: did not build (update this script; log $log)"
        missed=$((missed + 1))
    else
        echo "$name: CAUGHT by --test $target ($(grep -m1 -oE "panicked at [^:]*:[0-9]+|Test failed: .{0,90}" "$log"))"
    fi
    git checkout -q -- "$file"
    # The model saves the case it shrank under the mutation; that is not a failure of the real
    # code, so it is not kept.
    git checkout -q -- tests/proptest-regressions
done
exit "$missed"
