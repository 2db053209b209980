#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds the
# guest kernel (cached), checks formatting and lints, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU runs the guest kernel under TCG (tests/tests/linux.rs); mkfs.erofs
# builds the Linux guest's code disks.
scripts/setup.sh qemu-system-x86 erofs-utils
MICROVM_GUEST_KERNEL="$(kernel-config/build.sh)"
export MICROVM_GUEST_KERNEL
MICROVM_PYTHON="$(scripts/setup-python.sh)"
export MICROVM_PYTHON
# QEMU's guest reaches the host's vsock through this vhost-user backend
# (about 2.5 minutes to build, once).
if [[ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]]; then
    cargo install --locked --quiet vhost-device-vsock
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The freestanding guest programs build on their own; see guest-init/Cargo.toml.
cargo clippy -p guest-init --features baremetal --all-targets -- -D warnings
cargo clippy -p guest-init --features linux-init --all-targets -- -D warnings
cargo test --workspace
scripts/fuzz.sh 20
