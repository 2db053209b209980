#!/usr/bin/env bash
# Installs the Debian packages the project needs that a fresh machine may
# lack. Skips apt entirely when everything is there.
#   scripts/setup.sh [extra packages...]
set -euo pipefail
# protoc and its well-known types build etcd-client's gRPC code; openssl
# makes a fleet's certificates (scripts/fleet-certs.sh).
packages=(gcc binutils protobuf-compiler libprotobuf-dev openssl "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
