#!/usr/bin/env bash
# Creates the Python environment the end-to-end tests drive the Lambda API
# with (boto3 and the AWS CLI, awscli, from PyPI; the CLI's version is the
# one built on boto3's botocore), cached under
# ~/.cache/lambda-microvm/venv. Prints the interpreter's path.
set -euo pipefail
venv="${XDG_CACHE_HOME:-$HOME/.cache}/lambda-microvm/venv"
boto3_version=1.35.99
awscli_version=1.36.40
if ! "$venv/bin/python" -c "import boto3, sys; sys.exit(boto3.__version__ != '$boto3_version')" 2>/dev/null ||
    [[ "$("$venv/bin/aws" --version 2>&1)" != "aws-cli/$awscli_version "* ]]; then
    if ! python3 -m venv --help >/dev/null 2>&1; then
        "$(dirname "$0")/setup.sh" python3 python3-venv
    fi
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "boto3==$boto3_version" "awscli==$awscli_version" >&2
fi
echo "$venv/bin/python"
