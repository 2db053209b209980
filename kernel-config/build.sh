#!/usr/bin/env bash
# Builds the guest vmlinux from Debian's linux-source-6.12 with
# microvm.config, out of tree, and caches it keyed by a hash of the config
# and the exact source package version. Prints the vmlinux path last.
#
#   kernel-config/build.sh            build (or reuse) and print the path
#   kernel-config/build.sh --path     print the path only if it is built
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
package=linux-source-6.12
cache_root="${MICROVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lambda-microvm}/kernel"

need_packages=(bc bison flex libelf-dev libssl-dev make gcc xz-utils cpio "$package")
missing=()
for p in "${need_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done

version_of() { dpkg-query -W -f='${Version}' "$package" 2>/dev/null || true; }

if [[ "${1:-}" == "--path" ]]; then
    [[ ${#missing[@]} -eq 0 ]] || exit 1
    key=$(printf '%s\n%s\n' "$(version_of)" "$(sha256sum < "$here/microvm.config")" | sha256sum | cut -c1-16)
    [[ -f "$cache_root/$key/vmlinux" ]] || exit 1
    echo "$cache_root/$key/vmlinux"
    exit 0
fi

if [[ ${#missing[@]} -gt 0 ]]; then
    echo "kernel-config: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

version=$(version_of)
key=$(printf '%s\n%s\n' "$version" "$(sha256sum < "$here/microvm.config")" | sha256sum | cut -c1-16)
out="$cache_root/$key"
if [[ -f "$out/vmlinux" ]]; then
    echo "kernel-config: cached build for $package $version ($key)" >&2
    echo "$out/vmlinux"
    exit 0
fi

work="$cache_root/build-$key"
rm -rf "$work"
mkdir -p "$work"
echo "kernel-config: unpacking $package $version" >&2
tar -xf /usr/src/$package.tar.xz -C "$work"
src="$work/$package"
obj="$work/obj"
mkdir -p "$obj"

start=$(date +%s)
make -s -C "$src" O="$obj" KCONFIG_ALLCONFIG="$here/microvm.config" allnoconfig >&2

# Every option the fragment sets must have survived Kconfig's dependency
# resolution; a silently dropped option is a broken guest.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            if ! grep -qx "$line" "$obj/.config"; then
                echo "kernel-config: $line did not apply" >&2
                bad=1
            fi ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt% is not set}
            if grep -q "^$opt=" "$obj/.config"; then
                echo "kernel-config: $opt should be off" >&2
                bad=1
            fi ;;
    esac
done < "$here/microvm.config"
[[ $bad -eq 0 ]] || { echo "kernel-config: config check failed" >&2; exit 1; }

echo "kernel-config: building vmlinux with $(nproc) jobs (about 4.5 minutes on 2 cores)" >&2
make -s -C "$src" O="$obj" -j"$(nproc)" vmlinux >&2 &
make_pid=$!
# make -s is silent for minutes; say it is alive, and how far it got.
while kill -0 "$make_pid" 2>/dev/null; do
    for _ in $(seq 30); do
        kill -0 "$make_pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$make_pid" 2>/dev/null; then
        objects=$(find "$obj" -name '*.o' | wc -l)
        echo "kernel-config: building, $(( $(date +%s) - start ))s in, $objects objects compiled" >&2
    fi
done
wait "$make_pid"
elapsed=$(( $(date +%s) - start ))

mkdir -p "$out"
cp "$obj/vmlinux" "$out/vmlinux"
cp "$obj/.config" "$out/config"
rm -rf "$work"
size=$(stat -c %s "$out/vmlinux")
echo "kernel-config: built in ${elapsed}s, vmlinux is $size bytes ($package $version)" >&2
echo "$out/vmlinux"
