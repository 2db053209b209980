#!/usr/bin/env bash
# The checks CI runs, without the set-up: run before every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy -q --workspace --all-targets -- -D warnings
cargo clippy -q -p guest-init --features baremetal --all-targets -- -D warnings
cargo clippy -q -p guest-init --features linux-init --all-targets -- -D warnings
cargo clippy -q -p vmm -p host-services --features vmm/fuzzing,host-services/fuzzing -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! cargo test -q --workspace >"$log" 2>&1; then
    grep -E "panicked|FAILED|error" -A5 "$log" | head -40
    exit 1
fi
grep -E "^test result" "$log" | grep -v " 0 passed; 0 failed"
scripts/fuzz.sh 5
