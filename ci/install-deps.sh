#!/usr/bin/env bash
# Installs everything the build and the test suite need on a fresh
# Debian/Ubuntu machine (CI runs as root). Safe to run repeatedly.
#   ci/install-deps.sh          the build and the whole test suite
#   ci/install-deps.sh --demo   only what scripts/demo.sh uses (the build and fio)
set -euo pipefail
DEMO=0
[ "${1:-}" = "--demo" ] && DEMO=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  build-essential musl-tools pkg-config file curl ca-certificates
  fio qemu-utils nbdkit libnbd-bin fuse3
  e2fsprogs xfsprogs util-linux iproute2 iptables procps psmisc kmod
  prometheus
  docker.io busybox-static postgresql systemd
  fonts-dejavu-core
)
[ "$DEMO" = 1 ] && PACKAGES=(build-essential musl-tools pkg-config file fio curl ca-certificates)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "ci/install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq "${missing[@]}"
fi

# nbdfuse ships in libnbd-bin on Debian 12 and in its own package elsewhere.
if [ "$DEMO" = 0 ] && ! command -v nbdfuse >/dev/null 2>&1; then
  $SUDO apt-get install -y -qq nbdfuse || echo "ci/install-deps: nbdfuse unavailable; the FUSE host-attach test will skip"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "ci/install-deps: installing rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
# rust-toolchain.toml pins the version; this installs it with its components and the musl target.
(cd "$(dirname "$0")/.." && rustup show active-toolchain >/dev/null && rustup target add x86_64-unknown-linux-musl >/dev/null)
# cargo-fuzz runs the fuzz step of the test suite (scripts/tests/fuzz.sh) on the
# pinned stable toolchain, so no nightly is needed. Pinned like the toolchain.
if [ "$DEMO" = 0 ] && ! (cd "$(dirname "$0")/.." && cargo fuzz --version >/dev/null 2>&1); then
  echo "ci/install-deps: installing cargo-fuzz"
  (cd "$(dirname "$0")/.." && cargo install cargo-fuzz --version 0.13.2 --locked)
fi
# moto_server: a local S3-compatible server for the backup tests (started and stopped by them).
if [ "$DEMO" = 0 ] && ! command -v moto_server >/dev/null 2>&1; then
  echo "ci/install-deps: installing moto_server (PyPI)"
  python3 -m pip install --quiet 'moto[server]==5.2.1' \
    || echo "ci/install-deps: moto_server unavailable; the S3 backup test will skip"
fi
echo "ci/install-deps: done"
