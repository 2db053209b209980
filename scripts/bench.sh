#!/usr/bin/env bash
# Benchmarks: boot latency and memory against QEMU's microvm machine on the
# same guest, the bare-metal runtime from spawn to its first /next, then
# the devices against the host's own sockets and files (sealed disks
# included), snapshot restore against a cold boot of the same function,
# the optimize-once ingest of a 50 MB ZIP, and a fleet's throughput
# through 1 and 3 worker hosts against the single process (as root: the
# fleet's hosts run in network namespaces).
#   scripts/bench.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qemu-system-x86 etcd-server iproute2
echo "== release build (about 5 minutes the first time on 2 cores, seconds after)"
cargo build --release -p vmm -p guest-init -p microvm-tests --bins
target/x86_64-unknown-linux-gnu/release/boot_bench "$@"
target/x86_64-unknown-linux-gnu/release/runtime_boot_bench "$@"
target/x86_64-unknown-linux-gnu/release/snapshot_bench "$@"
target/x86_64-unknown-linux-gnu/release/device_bench
target/x86_64-unknown-linux-gnu/release/artifact_bench
if [[ $(id -u) -eq 0 ]]; then
    target/x86_64-unknown-linux-gnu/release/fleet_bench
else
    echo "fleet_bench: SKIPPED: network namespaces need root"
fi
