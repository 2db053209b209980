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
# The targets' build (release, instrumented: every dependency again) is
# kept between runs and clones; only the workspace's crates rebuild.
# Each clone's own crates add to it: past 8 GB it starts again.
cache=${MICROVM_FUZZ_TARGET_DIR:-$HOME/.cache/lambda-microvm/fuzz-target}
if [[ -d "$cache" ]] && (( $(du -sm "$cache" | cut -f1) > 8000 )); then
    echo "fuzz: the cached build is over 8 GB; starting it again" >&2
    rm -rf "$cache"
fi
build_dir=(--target-dir "$cache")
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
# All targets are built in one go; then they run two at a time, one per
# core here, each with its own output, reported in order.
echo "fuzz: building ${#targets[@]} targets" >&2
cargo fuzz build -s none "${build_dir[@]}" > "$log" 2>&1 || {
    tail -40 "$log"
    echo "fuzz: building the targets failed" >&2
    exit 1
}
outputs=$(mktemp -d)
trap 'rm -rf "$log" "$seeds" "$outputs"' EXIT
fuzz_one() {
    local target=$1 out="$outputs/$1"
    local started
    started=$(date +%s)
    mkdir -p "corpus/$target"
    local corpora=("corpus/$target")
    [[ ! -d "$seeds/$target" ]] || corpora+=("$seeds/$target")
    # The corpus stays in fuzz/corpus between runs; a crash fails the run
    # and leaves its input in fuzz/artifacts. libFuzzer reports its
    # progress on stderr every few seconds; the last report is shown.
    if ! cargo fuzz run "$target" -s none "${build_dir[@]}" "${corpora[@]}" -- "$limit" -print_final_stats=1 > "$out.log" 2>&1; then
        { tail -40 "$out.log"; echo "fuzz: $target failed"; } > "$out.result"
        return 1
    fi
    local last runs
    last=$(grep -E '^#[0-9]+' "$out.log" | tail -1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out.log")
    echo "fuzz: $target: ${runs:-?} executions in $(( $(date +%s) - started ))s, no crash; last report: $last" > "$out.result"
}
pending=()
for target in "${targets[@]}"; do
    echo "fuzz: $target ($limit)"
    fuzz_one "$target" &
    pending+=($!)
    if [[ ${#pending[@]} -ge 2 ]]; then
        wait "${pending[0]}" || true
        pending=("${pending[@]:1}")
    fi
done
wait || true
failed=0
for target in "${targets[@]}"; do
    cat "$outputs/$target.result" 2>/dev/null || echo "fuzz: $target left no result"
    grep -q ", no crash;" "$outputs/$target.result" 2>/dev/null || failed=1
done
[[ $failed -eq 0 ]] || { echo "fuzz: a target failed (above)" >&2; exit 1; }
