#!/usr/bin/env bash
# Creates the Python environment the end-to-end tests drive the Lambda API
# with (boto3 from PyPI), cached under ~/.cache/lambda-microvm/venv. Prints
# the interpreter's path.
set -euo pipefail
venv="${XDG_CACHE_HOME:-$HOME/.cache}/lambda-microvm/venv"
boto3_version=1.35.99
if ! "$venv/bin/python" -c "import boto3, sys; sys.exit(boto3.__version__ != '$boto3_version')" 2>/dev/null; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        "$(dirname "$0")/setup.sh" python3 python3-venv
    fi
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "boto3==$boto3_version" >&2
fi
echo "$venv/bin/python"
