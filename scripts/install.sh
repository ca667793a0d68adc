#!/usr/bin/env bash
# Install everything remotecli needs on a fresh Debian machine (run as root, or with sudo):
# Debian packages (QEMU, mmdebstrap, PostgreSQL for the tests, ...), a Python virtualenv in
# .venv with remotecli and its development tools. Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

APT_PACKAGES=(
  # VMs and guest images
  qemu-system-x86 qemu-utils mmdebstrap busybox-static e2fsprogs cpio zstd
  # Guest confinement: host firewall rules on QEMU's user (drivers/qemu/confinement.py)
  nftables passwd
  # Controller runtime and tools
  python3 python3-venv python3-dev build-essential ca-certificates
  # Tests and benchmarks
  postgresql wrk iproute2 procps chromium xvfb xdotool
  # The Incus test cluster (tests/support/incus_cluster.py): namespaces and mounts (util-linux),
  # the controller's client certificate; Incus itself goes into a trixie tree made with mmdebstrap
  util-linux openssl
)
# Node.js and npm (front-end packages, the test IdP, the CLIs in the cli image): Debian's unless a
# node/npm is already installed another way (Debian's npm conflicts with NodeSource's nodejs).
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt-get install ${missing[*]}" >&2
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ -x scripts/install-system-deps.sh ]; then
  scripts/install-system-deps.sh
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
(cd src/remotecli/web && npm ci --no-audit --no-fund --loglevel=error)  # dashboard front-end packages
echo "install: done. Run: .venv/bin/remotecli up" >&2
