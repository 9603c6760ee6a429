#!/usr/bin/env bash
# A short fuzz run of every decoder of outside input: NBD requests, options and
# negotiation, peer frames and replication payloads, on-disk blocks, API JSON
# bodies and the TOML config
# (node/fuzz): builds the cargo-fuzz targets on the pinned stable toolchain
# (RUSTC_BOOTSTRAP=1 stands in for nightly) and runs them side by side for
# FUZZ_SECONDS each. Fails if a target panics, hangs or runs out of memory;
# the input that did it is kept in node/fuzz/artifacts/<target>/.
#   scripts/tests/fuzz.sh                     every target for 30 s
#   FUZZ_SECONDS=600 scripts/tests/fuzz.sh    a longer session
#   FUZZ_TARGETS=nbd_request scripts/tests/fuzz.sh
# New inputs accumulate in node/fuzz/corpus/<target>/ (gitignored), on top
# of the committed seeds in node/fuzz/seeds/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../../node"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "SKIP: fuzz: cargo-fuzz is not installed (ci/install-deps.sh installs it)"
  exit 0
fi
if ! command -v c++ >/dev/null 2>&1; then
  echo "SKIP: fuzz: no C++ compiler to build libFuzzer (ci/install-deps.sh installs build-essential)"
  exit 0
fi

seconds=${FUZZ_SECONDS:-30}
read -r -a targets <<< "${FUZZ_TARGETS:-nbd_request nbd_option nbd_handshake peer_frame disk_records api_input}"
# Unoptimized and without AddressSanitizer: the code under test is
# `#![forbid(unsafe_code)]`, so ASan finds little there, and an optimized,
# instrumented build of the node's dependencies would take most of the
# step's time budget (speed of the CI step over fuzzing throughput; use
# FUZZ_BUILD="--release --sanitizer address" for a long session).
read -r -a build_flags <<< "${FUZZ_BUILD:---dev --sanitizer none}"
export RUSTC_BOOTSTRAP=1

started=$SECONDS
cargo fuzz build --fuzz-dir fuzz "${build_flags[@]}"
echo "fuzz: built in $((SECONDS - started)) s"

logs=$(mktemp -d /tmp/ballast-fuzz.XXXXXX)
trap 'rm -rf "$logs"' EXIT
# One target per process, all at once: each is single-threaded, and the
# step's wall time stays at FUZZ_SECONDS however many targets there are.
declare -A pids
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  # Value profiling guides the fuzzer through 16-bit fields (commands,
  # flags, counts) and widened compares, which it otherwise guesses blind.
  cargo fuzz run --fuzz-dir fuzz "${build_flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -use_value_profile=1 >"$logs/$target.log" 2>&1 &
  pids[$target]=$!
done
failed=()
for target in "${targets[@]}"; do
  if wait "${pids[$target]}"; then
    echo "fuzz: $target: ok: $(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$target.log" | tail -n 1)"
  else
    mkdir -p "fuzz/artifacts/$target"
    cp "$logs/$target.log" "fuzz/artifacts/$target/fuzz.log"
    echo "fuzz: $target: FAILED (whole log: node/fuzz/artifacts/$target/fuzz.log):"
    grep -E -A 3 'panicked at|ERROR: libFuzzer|ALARM|out-of-memory|^error' "$logs/$target.log" | head -n 20 || true
    grep -E -A 2 'Failing input' "$logs/$target.log" | tail -n 1 || true
    failed+=("$target")
  fi
done
echo "fuzz: done in $((SECONDS - started)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}; replay an input in node/ with" \
    "RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz ${build_flags[*]} <target> <input>"
  exit 1
fi
