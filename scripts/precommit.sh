#!/usr/bin/env bash
# The checks CI runs, without the set-up: run before every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy -q --workspace --all-targets -- -D warnings
cargo test -q --workspace 2>&1 | grep -E "^test result|panicked|FAILED" | grep -v " 0 passed; 0 failed"
! cargo test -q --workspace 2>&1 | grep -qE "FAILED|panicked"
