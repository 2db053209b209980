#!/usr/bin/env bash
# The main job: starts lambda-worker with its embedded defaults, deploys
# the example function with boto3, invokes it cold, warm and provisioned,
# and prints the responses and timings; deploys a python3.11 function
# where the host can boot Linux guests; then the invoke benchmark (cold
# starts, warm invokes, a load run at concurrency 32).
# Boot latency against QEMU is scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh wabt
python=$(scripts/setup-python.sh)
echo "== release build (about 6 minutes the first time on 2 cores, seconds after)"
started=$(date +%s)
cargo build --release -p vmm -p microvm-tests --bins
cargo build --config host-services/panic-unwind.toml --release -p host-services --bins
cargo build --release -p guest-init --features baremetal --bin baremetal
echo "== built in $(( $(date +%s) - started ))s"
bin=target/x86_64-unknown-linux-gnu/release

data=$(mktemp -d /tmp/lambda-worker.XXXXXX)
worker_pid=
cleanup() {
    [[ -n $worker_pid ]] && kill -INT "$worker_pid" 2>/dev/null && wait "$worker_pid" || true
    rm -rf "$data"
}
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=AKIDEXAMPLE AWS_SECRET_ACCESS_KEY=example-secret
echo "[{\"AccessKeyId\":\"$AWS_ACCESS_KEY_ID\",\"SecretAccessKey\":\"$AWS_SECRET_ACCESS_KEY\",\"AccountId\":\"111111111111\"}]" \
    > "$data/credentials.json"
wat2wasm examples/hello/hello.wat -o "$data/hello.wasm"

# Until the worker listens; its log if it dies first.
wait_for_worker() {
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/9000) 2>/dev/null && return
        kill -0 "$worker_pid" 2>/dev/null || { cat "$1"; exit 1; }
        sleep 0.05
    done
}

echo "== lambda-worker (data in $data, log in $data/worker.log)"
"$bin/lambda-worker" --data-dir "$data" --listen 127.0.0.1:9000 \
    --credentials "$data/credentials.json" --vmm "$bin/vmm" --guest "$bin/baremetal" \
    2> "$data/worker.log" &
worker_pid=$!
wait_for_worker "$data/worker.log"

echo "== boto3: deploy and invoke examples/hello"
"$python" examples/hello/demo.py http://127.0.0.1:9000 "$data/hello.wasm"
echo "== environments"
grep -E "created|destroyed" "$data/worker.log" | sed "s/^.*lifecycle: //" || true
kill -INT "$worker_pid" && wait "$worker_pid"
worker_pid=

echo "== a Linux function: python3.11 (examples/python) with boto3"
if [[ -d /sys/module/kvm_pvm ]]; then
    echo "skipped: this host's KVM is PVM, which boots no Linux guest (they run in the L1 test machine: docs/test-machine.md)"
else
    kernel=$(kernel-config/build.sh)
    runtime=$(scripts/build-python-runtime.sh)
    cargo build --release -p guest-init --features linux-init --bin init
    "$bin/lambda-worker" --data-dir "$data" --listen 127.0.0.1:9000 \
        --credentials "$data/credentials.json" --vmm "$bin/vmm" --guest "$bin/baremetal" \
        --linux-kernel "$kernel" --linux-init "$bin/init" --linux-runtime "python3.11=$runtime" \
        2> "$data/worker-linux.log" &
    worker_pid=$!
    wait_for_worker "$data/worker-linux.log"
    "$python" examples/python/demo.py http://127.0.0.1:9000
    kill -INT "$worker_pid" && wait "$worker_pid"
    worker_pid=
fi

echo "== invoke benchmark"
"$bin/invoke_bench" --cold 20 --warm 200 --total 2000 --concurrency 32
