#!/usr/bin/env bash
# Breaks each rule the model test (tests/model.rs) exists for, one at a time, and checks that
# the model test fails. Run from the repository root on a clean work tree:
#
#     bash scripts/model-mutations.sh            # every mutation
#     bash scripts/model-mutations.sh floors     # one of them
#
# Each mutation is a literal replacement in one file, checked to have applied, then undone with
# `git checkout` whatever happens. Prints one line per mutation: CAUGHT or MISSED. The exit
# status is the number missed. Takes about a minute per mutation (the model's 512 cases).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! git diff --quiet -- crates; then
    echo "crates/ has uncommitted changes: commit or stash them first" >&2
    exit 100
fi

# name | file | text | replacement (perl regex-quoted with \Q..\E)
mutations=(
    "version-rule|crates/core/src/entry.rs|Slot::Live(entry) => version >= entry.version,|Slot::Live(_) => true,"
    "tombstones|crates/core/src/entry.rs|Some(Slot::Tombstone { version: v, until })|{ let _ = (v, until); None }"
    "manual-tombstones|crates/core/src/entry.rs|entry.version.checked_sub(1).map(\|below\| Slot::Tombstone {|entry.version.checked_sub(1).filter(\|_\| false).map(\|below\| Slot::Tombstone {"
    "invalidation-epoch|crates/core/src/chain/marks.rs|Some(m) if m.blind_at > ticket => Verdict::Suspect,|"
    "version-marks|crates/core/src/chain/marks.rs|Some(m) if version < m.version => Verdict::Older,|"
    "floors|crates/core/src/chain/floors.rs|self.len.load(Ordering::Relaxed) == 0 \|\| self.check(key, version, clock)|{ let _ = (key, version, clock); true }"
    "manual-invalidation|crates/core/src/chain/invalidate.rs|async move { this.invalidate_everywhere(&key, None).await }|async move { let _ = (this, key); Ok(()) }"
    "bottom-first|crates/core/src/chain/invalidate.rs|for i in (0..inner.tiers.len()).rev() {|for i in 0..inner.tiers.len() {"
)

missed=0
for m in "${mutations[@]}"; do
    IFS='|' read -r name file from to <<<"$(sed 's/\\|/\x01/g' <<<"$m")"
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
    if cargo test -q --test model >"/tmp/model-mutation-$name.log" 2>&1; then
        echo "$name: MISSED (the model test passed; log /tmp/model-mutation-$name.log)"
        missed=$((missed + 1))
    elif grep -q "error\[E" "/tmp/model-mutation-$name.log"; then
        echo "$name: did not build (update this script; log /tmp/model-mutation-$name.log)"
        missed=$((missed + 1))
    else
        echo "$name: CAUGHT ($(grep -m1 -o 'minimal failing input.*' "/tmp/model-mutation-$name.log" | cut -c1-100))"
    fi
    git checkout -q -- "$file"
done
exit "$missed"
