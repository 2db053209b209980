#!/usr/bin/env bash
# Prepares the L1 test machine: a Linux VM under QEMU's TCG emulator with
# `-cpu max`, whose emulated AMD SVM lets Debian's cloud kernel load
# kvm_amd and offer a /dev/kvm that takes the hardware-KVM paths (see
# docs/test-machine.md). Installs QEMU (with its virtiofsd) and a static
# busybox, downloads the cloud kernel package once, and keeps its kernel
# and the modules the machine loads in a cache directory. Prints that
# directory last.
#
#   scripts/setup-l1.sh           prepare (or reuse) and print the path
#   scripts/setup-l1.sh --path    print the path only if it is prepared
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${MICROVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lambda-microvm}/l1"
current="$cache_root/current"

# Loaded in this order by the machine's init: each after what it needs.
modules=(irqbypass kvm kvm-amd virtio_ring virtio virtio_pci_modern_dev
    virtio_pci_legacy_dev virtio_pci fuse virtiofs)

ready() {
    [[ -f "$current/vmlinuz" && -f "$current/modules/order" && -x /usr/lib/qemu/virtiofsd \
        && -x /bin/busybox && -x /usr/bin/qemu-system-x86_64 ]]
}

if [[ "${1:-}" == "--path" ]]; then
    ready || exit 1
    readlink -f "$current"
    exit 0
fi

"$here/setup.sh" qemu-system-x86 busybox-static
if ready; then
    echo "setup-l1: cached L1 kernel $(cat "$current/version")" >&2
    readlink -f "$current"
    exit 0
fi

# The package the metapackage names today; kept until the cache is removed,
# so a kernel security update does not re-download it on every run.
package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
if [[ -z "$package" ]]; then
    echo "setup-l1: apt knows no linux-image-cloud-amd64; run apt-get update" >&2
    exit 1
fi
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/download.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "setup-l1: downloading $package (about 27 MB)" >&2
(cd "$work" && apt-get download "$package" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
deb=$(ls "$work"/*.deb 2>/dev/null | head -1)
[[ -n "$deb" ]] || { echo "setup-l1: apt-get download $package failed" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/root"
version=$(ls "$work/root/lib/modules")

out="$cache_root/$version"
rm -rf "$out"
mkdir -p "$out/modules"
cp "$work/root/boot/vmlinuz-$version" "$out/vmlinuz"
loaded=()
for m in "${modules[@]}"; do
    ko=$(find "$work/root/lib/modules/$version" -name "$m.ko" | head -1)
    [[ -n "$ko" ]] || { echo "setup-l1: $package has no module $m" >&2; exit 1; }
    # A module's dependencies must come before it in the order.
    deps=$(strings "$ko" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do
        [[ " ${loaded[*]} " == *" ${d//_/-} "* || " ${loaded[*]} " == *" ${d//-/_} "* ]] \
            || { echo "setup-l1: $m needs $d, which is not loaded before it" >&2; exit 1; }
    done
    cp "$ko" "$out/modules/"
    echo "$m" >> "$out/modules/order"
    loaded+=("$m")
done
echo "$package $version" > "$out/version"
ln -sfn "$version" "$current"
echo "setup-l1: L1 kernel $version with ${#modules[@]} modules in $out" >&2
readlink -f "$current"
