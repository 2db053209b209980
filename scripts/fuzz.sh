#!/usr/bin/env bash
# Fuzzes the parsers a guest feeds (fuzz/: the block device's requests, the
# vsock TX packets) for a bounded time each, on the stable toolchain
# (`-s none`: no sanitizer). Installs cargo-fuzz once, into ~/.cargo/bin.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --quiet --locked cargo-fuzz@0.13.2 >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in block_request vsock_packet; do
    echo "fuzz: $target for ${seconds}s"
    # The corpus stays in fuzz/corpus between runs; a crash fails the run
    # and leaves its input in fuzz/artifacts.
    if ! cargo fuzz run "$target" -s none -- -max_total_time="$seconds" > "$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $target failed" >&2
        exit 1
    fi
    grep -E "^Done" "$log"
done
