#!/usr/bin/env bash
# Fuzzes the parsers a guest or a caller feeds (fuzz/: the VMM's block
# requests, vsock TX packets and virtio-mmio registers; the worker's
# Runtime API, log stream, SigV4 checks and function ZIPs; the guest
# init's start-up message) on the stable toolchain (`-s none`: no
# sanitizer). Installs cargo-fuzz once, into
# ~/.cargo/bin. CI runs the short form; the deep run is the scheduled one
# (docs/fuzzing.md has its last figures).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     each target for a time (20 s)
#   scripts/fuzz.sh --runs N [TARGET...]     each target for N executions
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
limit="-max_total_time=${1:-20}"
if [[ "${1:-}" == "--runs" ]]; then
    [[ -n "${2:-}" ]] || { echo "fuzz: --runs needs a count" >&2; exit 2; }
    limit="-runs=$2"
    shift 2
elif [[ $# -gt 0 ]]; then
    shift
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(block_request vsock_packet mmio_transport
    runtime_api_request log_stream signed_request function_zip environ_message)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --quiet --locked cargo-fuzz@0.13.2 >&2
fi
log=$(mktemp)
seeds=$(mktemp -d)
trap 'rm -rf "$log" "$seeds"' EXIT
# Seeds from the unit tests that check them (a driver's whole set-up and
# one read, a runtime taking an event and answering, signed requests, a
# function ZIP): from nothing, the fuzzer takes long to find such
# sequences.
# The workspace's own test build (same features as `cargo test
# --workspace`) runs them: a build of one package alone would unify
# features differently and compile much of the tree a second time.
(cd .. && MICROVM_FUZZ_SEED_DIR="$seeds" cargo test -q --workspace --lib -- \
    a_driver_set_up_through_the_registers_reads_the_disk fuzzing > /dev/null)
for target in "${targets[@]}"; do
    echo "fuzz: $target ($limit)"
    started=$(date +%s)
    mkdir -p "corpus/$target"
    corpora=("corpus/$target")
    [[ ! -d "$seeds/$target" ]] || corpora+=("$seeds/$target")
    # The corpus stays in fuzz/corpus between runs; a crash fails the run
    # and leaves its input in fuzz/artifacts. libFuzzer reports its
    # progress on stderr every few seconds; the last report is shown.
    if ! cargo fuzz run "$target" -s none "${corpora[@]}" -- "$limit" -print_final_stats=1 > "$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $target failed" >&2
        exit 1
    fi
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz: $target: ${runs:-?} executions in $(( $(date +%s) - started ))s, no crash; last report: $last"
done
