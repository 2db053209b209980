#!/usr/bin/env bash
# Boot benchmark against QEMU's microvm machine on the same guest.
#   scripts/bench.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qemu-system-x86
cargo build --release -q -p vmm -p microvm-tests --bins
exec target/x86_64-unknown-linux-gnu/release/boot_bench "$@"
