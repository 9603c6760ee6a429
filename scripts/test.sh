#!/usr/bin/env bash
# Runs the whole test suite: format, lints, unit, property and integration
# tests (real loop devices, io_uring, NBD clients where installed). Tests
# that cannot run here print "SKIP: <why>"; they are counted in the summary.
#   scripts/test.sh               everything (installs what it misses first: ci/install-deps.sh)
#   scripts/test.sh --quick       skip the long crash loops
#   scripts/test.sh --no-install  run with what this machine has
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
INSTALL=1
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --no-install) INSTALL=0 ;;
    *) echo "usage: scripts/test.sh [--quick] [--no-install]" >&2; exit 2 ;;
  esac
done
# Safe to repeat: it installs only what is missing (apt packages, rustup, cargo-fuzz).
if [ "$INSTALL" = 1 ] && ! ci/install-deps.sh; then
  echo "test: installing the dependencies failed; scripts/test.sh --no-install runs with what is here" >&2
  exit 1
fi
# rustup installed by ci/install-deps.sh in this session is not on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

export BALLAST_TEST_QUICK=$QUICK
LOG=$(mktemp /tmp/ballast-test.XXXXXX)
# Tests that cannot run append "SKIP: <test>: <why>" here (captured test
# output would hide a printed line).
export BALLAST_SKIP_LOG=$(mktemp /tmp/ballast-skips.XXXXXX)
# Node logs of failing tests are kept here (the tests delete them otherwise).
export BALLAST_TEST_LOGS=${BALLAST_TEST_LOGS:-/var/tmp/ballast-test-logs}
mkdir -p "$BALLAST_TEST_LOGS"
# Marks when this run started: the logs it kept are the newer ones.
STARTED=$(mktemp /tmp/ballast-started.XXXXXX)
trap 'rm -f "$LOG" "$BALLAST_SKIP_LOG" "$STARTED"' EXIT
failed=()
# A fresh build of every test binary and the fuzz targets takes several GB;
# say how much room there is, so a "No space left on device" is no mystery.
df -h . /var/tmp | sed 's/^/disk: /'
# Incremental caches only help repeated builds; CI builds once.
[ -n "${CI:-}" ] && export CARGO_INCREMENTAL=0

step() {
  local name=$1; shift
  echo "=== $name: $*"
  if "$@" 2>&1 | tee -a "$LOG"; then echo "=== $name: ok"; else echo "=== $name: FAILED"; failed+=("$name"); fi
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --locked --workspace --all-targets -- -D warnings
# One test thread per core keeps the loop-device and process tests from starving each other.
# --no-fail-fast: one failing test binary does not hide the results of the others.
step tests cargo test --locked --workspace --no-fail-fast -- --test-threads=2
# The criterion micro-benchmarks, each run once (no timing): they keep building and working.
step benches cargo test --locked -p disk-layout -p node --bench hot_paths --bench request_codecs
for script in scripts/tests/*.sh; do
  [ -e "$script" ] || continue
  step "$(basename "$script" .sh)" "$script"
done

passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$LOG" | awk '{s+=$4} END {print s+0}')
failed_tests=$(grep -Eo '[0-9]+ failed;' "$LOG" | awk '{s+=$1} END {print s+0}')
grep -h '^SKIP:' "$LOG" >> "$BALLAST_SKIP_LOG" || true
skips=$(wc -l < "$BALLAST_SKIP_LOG")
echo
if [ "$failed_tests" -gt 0 ]; then
  echo "node logs of the failing tests: $BALLAST_TEST_LOGS"
  # CI keeps only this output: the warnings and errors of the logs this run kept.
  find "$BALLAST_TEST_LOGS" -name '*.log' -newer "$STARTED" 2>/dev/null | sort | while read -r kept; do
    echo "--- warnings and errors of $(basename "$kept") (last 40)"
    grep -E ' (WARN|ERROR) ' "$kept" | tail -40 | cut -c1-400
  done
fi
echo "summary: rust tests passed: $passed, failed: $failed_tests, skipped: $skips"
sort "$BALLAST_SKIP_LOG" | uniq -c | sed 's/^/  /' || true
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
