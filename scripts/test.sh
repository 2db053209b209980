#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds the
# guest kernel (cached), prepares the L1 test machine (hardware KVM on
# QEMU's emulated AMD SVM, for the tests that need it; cached), checks
# formatting and lints, runs every test and ends with one summary line:
# passed, failed, skipped (a test that could not run here says so and is
# not counted as passed).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { echo "== test.sh: $* ($(( $(date +%s) - started ))s in)" >&2; }

# QEMU runs the guest kernel under TCG (tests/tests/linux.rs); mkfs.erofs
# builds the Linux guest's code disks; the fleet's tests start etcd and put
# each host in a network namespace of its own.
step "Debian packages"
scripts/setup.sh qemu-system-x86 erofs-utils etcd-server iproute2
step "guest kernel (about 4 minutes to build once, then cached)"
MICROVM_GUEST_KERNEL="$(kernel-config/build.sh)"
export MICROVM_GUEST_KERNEL
step "L1 test machine (Debian's cloud kernel, downloaded once)"
MICROVM_L1="$(scripts/setup-l1.sh)"
export MICROVM_L1
step "Python with boto3 and the AWS CLI"
MICROVM_PYTHON="$(scripts/setup-python.sh)"
export MICROVM_PYTHON
step "python3.11 runtime image (Debian's Python and awslambdaric, built once)"
MICROVM_PYTHON_RUNTIME="$(scripts/build-python-runtime.sh)"
export MICROVM_PYTHON_RUNTIME

step "cargo fmt and clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The freestanding guest programs build on their own; see guest-init/Cargo.toml.
cargo clippy -p guest-init --features baremetal --all-targets -- -D warnings
cargo clippy -p guest-init --features linux-init --all-targets -- -D warnings
cargo clippy -p vmm -p host-services --features vmm/fuzzing,host-services/fuzzing -- -D warnings

step "cargo test (the Linux tests boot the L1 machine, one at a time)"
log=$(mktemp)
MICROVM_SKIP_LOG=$(mktemp)
MICROVM_RETRY_LOG=$(mktemp)
export MICROVM_SKIP_LOG MICROVM_RETRY_LOG
trap 'rm -f "$log" "$MICROVM_SKIP_LOG" "$MICROVM_RETRY_LOG"' EXIT
status=0
# --no-fail-fast: a failure in one test binary must not hide the others.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?

step "fuzzing"
[[ $status -ne 0 ]] || scripts/fuzz.sh 20 || status=$?

# libtest counts a skipped test as passed; the skip log says which were.
read -r ran failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p + 0, f + 0}' "$log")
skipped=$(grep -c . "$MICROVM_SKIP_LOG" || true)
retried=$(grep -c . "$MICROVM_RETRY_LOG" || true)
echo "== test.sh: $((ran - skipped)) passed ($retried on a later run in the emulated L1 machine), $failed failed, $skipped skipped ($(( $(date +%s) - started ))s)"
sed 's/^/   skipped: /' "$MICROVM_SKIP_LOG"
sed 's/^/   retried: /' "$MICROVM_RETRY_LOG"
exit "$status"
