#!/usr/bin/env bash
# Builds the python3.11 runtime image for Linux guests: Debian 12's
# Python 3.11 and the libraries it loads (Debian packages, unpacked), the
# official Runtime Interface Client `awslambdaric` from PyPI in
# /var/runtime, and /var/runtime/bootstrap, which starts it on the
# function's handler. One read-only EROFS image, the guest's root file
# system beside its init; a worker takes it with
# `--linux-runtime python3.11=IMAGE`. Cached under
# ~/.cache/lambda-microvm/runtimes (about a minute to build once). Prints
# the image's path.
set -euo pipefail
cd "$(dirname "$0")/.."
ric_version=4.2.2
cache="${XDG_CACHE_HOME:-$HOME/.cache}/lambda-microvm/runtimes"
key=$(cat "$0" | sha256sum | cut -c1-16)
image="$cache/python3.11-$key.erofs"
if [[ -f "$image" ]]; then
    echo "$image"
    exit 0
fi
scripts/setup.sh erofs-utils
say() { echo "python-runtime: $*" >&2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$work/debs" "$work/wheels" "$root"

# The interpreter's packages and what they depend on, without the
# packaging tools and Perl that Debian's dependencies bring along (a
# function's root file system installs nothing).
roots=(python3.11-minimal libpython3.11-stdlib libstdc++6 ca-certificates)
if ! apt-cache show python3.11-minimal >/dev/null 2>&1; then
    apt-get update -qq
fi
mapfile -t packages < <(apt-cache depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends "${roots[@]}" |
    grep -v '^[ <]' | grep -vxE 'dpkg|install-info|tar|perl|perl-base|perl-modules-.*|libperl.*|debconf.*|openssl|mailcap|mime-support|readline-common|libgdbm-compat4' |
    sort -u)
say "downloading ${#packages[@]} Debian packages"
(cd "$work/debs" && apt-get download -qq "${packages[@]}" 2>&1 | grep -v unsandboxed >&2 || true)
[[ $(ls "$work/debs" | wc -l) -eq ${#packages[@]} ]] || {
    say "expected ${#packages[@]} packages, got $(ls "$work/debs" | wc -l)"
    exit 1
}
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$root"
done
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian} "$root"/var/lib/dpkg
# ca-certificates ships the certificates; its maintainer script makes the
# bundle that Python's ssl module opens.
cat "$root"/usr/share/ca-certificates/*/*.crt > "$root/etc/ssl/certs/ca-certificates.crt"

say "downloading awslambdaric $ric_version from PyPI"
pip download -q --only-binary :all: --platform manylinux2014_x86_64 \
    --python-version 3.11 --implementation cp -d "$work/wheels" \
    "awslambdaric==$ric_version" >&2
mkdir -p "$root/var/runtime"
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$root/var/runtime"
done
cat > "$root/var/runtime/bootstrap" <<'EOF'
#!/usr/bin/python3.11 -u
# Lambda's python3.11 bootstrap: the Runtime Interface Client on the
# function's handler, which it imports from /var/task, then /opt/python.
import os
import sys

sys.path[:0] = ["/var/runtime", os.environ.get("LAMBDA_TASK_ROOT", "/var/task"), "/opt/python"]
from awslambdaric.__main__ import main

main(["awslambdaric", os.environ["_HANDLER"]])
EOF
chmod 755 "$root/var/runtime/bootstrap"

# Byte-compiled once here: the image is read-only, and a guest that
# compiled the standard library at each cold start would pay for it at
# every one. The runtime's own interpreter does it, which also proves
# that it runs and finds the client.
say "compiling the standard library and the client"
chroot "$root" /usr/bin/python3.11 -m compileall -q \
    --invalidation-mode unchecked-hash /usr/lib/python3.11 /var/runtime >&2
chroot "$root" /usr/bin/python3.11 -c \
    "import sys; sys.path[:0] = ['/var/runtime']; import awslambdaric.bootstrap, runtime_client"

mkdir -p "$cache"
mkfs.erofs --quiet -T0 --all-root -U00000000-0000-0000-0000-000000000000 "$image.partial" "$root" >&2
mv "$image.partial" "$image"
say "$(du -h "$image" | cut -f1) in $image"
echo "$image"
