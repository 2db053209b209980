#!/usr/bin/env bash
# The main job: builds the VMM, boots a guest through each entry path,
# and runs the boot benchmark against QEMU microvm.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qemu-system-x86
cargo build --release -q -p vmm -p microvm-tests --bins
vmm=target/x86_64-unknown-linux-gnu/release/vmm
fixtures=$(dirname "$(ls target/x86_64-unknown-linux-gnu/release/build/microvm-tests-*/out/pvh.elf | head -1)")

for kernel in linux64.elf pvh.elf bzImage; do
    echo "== vmm --kernel $kernel"
    "$vmm" --kernel "$fixtures/$kernel" --cmdline "console=ttyS0 hello from the host"
done
echo "== boot benchmark"
target/x86_64-unknown-linux-gnu/release/boot_bench --runs 30
