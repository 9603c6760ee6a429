#!/usr/bin/env bash
# Builds the single static ballast binary (x86_64 musl, mimalloc) into dist/ballast.
#   scripts/build.sh            release build
#   scripts/build.sh --debug    faster build for development
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=release
if [ "${1:-}" = "--debug" ]; then PROFILE=dev; fi
TARGET=x86_64-unknown-linux-musl
# rustup installed by ci/install-deps.sh in this session is not on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

if ! rustup target list --installed | grep -qx "$TARGET"; then
  echo "build: adding Rust target $TARGET"
  rustup target add "$TARGET"
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
  echo "build: installing musl-tools (needed to compile mimalloc for musl)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -qq musl-tools
fi

cargo build --locked --profile "$PROFILE" --target "$TARGET" -p node --bin ballast
OUT_DIR=release; [ "$PROFILE" = dev ] && OUT_DIR=debug
mkdir -p dist
cp "target/$TARGET/$OUT_DIR/ballast" dist/ballast
if ! file dist/ballast | grep -q "statically linked"; then
  echo "build: dist/ballast is not statically linked:" >&2
  file dist/ballast >&2
  exit 1
fi
echo "build: dist/ballast ($(du -h dist/ballast | cut -f1), $(file -b dist/ballast | cut -d, -f1-2))"
