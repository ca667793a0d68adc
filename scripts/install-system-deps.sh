#!/usr/bin/env bash
# Install the host packages remotecli's image builder and QEMU driver need (Debian/Ubuntu).
# Idempotent: packages already installed are left alone. Used by the README set-up and by CI.
#
#   qemu-system-x86  qemu-system-x86_64 (microvm machine), runs the guests
#   qemu-utils       qemu-img: per-VM qcow2 overlays
#   mmdebstrap       builds the Debian root filesystems and extracts the kernel package
#   busybox-static   (the initramfs takes busybox from the guest suite's package; kept for debugging)
#   e2fsprogs        mkfs.ext4 -d: the rootfs.ext4 images
#   cpio, zstd       inspecting/repacking initramfs images by hand
#   npm, nodejs      host-side npm install of the CLIs into the cli image
#   ca-certificates  HTTPS to the npm registry
#   nftables         guest network isolation (rules on QEMU's user; drivers/qemu/confinement.py)
set -euo pipefail

PACKAGES=(
    qemu-system-x86
    qemu-utils
    mmdebstrap
    busybox-static
    e2fsprogs
    cpio
    zstd
    ca-certificates
    util-linux
    nftables
)
# npm: skip if a node/npm is already installed some other way (e.g. NodeSource), since Debian's
# npm package conflicts with NodeSource's nodejs.
if ! command -v npm >/dev/null 2>&1; then
    PACKAGES+=(nodejs npm)
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-system-deps: all packages present (${PACKAGES[*]})"
    exit 0
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
