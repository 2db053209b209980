#!/usr/bin/env bash
# Installs the Debian packages the project needs that a fresh machine may
# lack. Skips apt entirely when everything is there.
#   scripts/setup.sh [extra packages...]
set -euo pipefail
packages=(gcc binutils "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
