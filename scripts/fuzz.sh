#!/usr/bin/env bash
# Fuzzes every decoder of outside input for MINUTES minutes per target, all
# targets side by side (node/fuzz; the same runner as the test suite's short
# fuzz step, scripts/tests/fuzz.sh). A crash keeps its input in
# node/fuzz/artifacts/<target>/ and fails the run.
#   scripts/fuzz.sh 10                       every target for 10 minutes
#   FUZZ_TARGETS=nbd_request scripts/fuzz.sh 60
#   FUZZ_BUILD="--release --sanitizer address" scripts/fuzz.sh 30
set -euo pipefail
minutes=${1:-}
case "$minutes" in
  ''|*[!0-9]*) echo "usage: scripts/fuzz.sh MINUTES (whole minutes per target)" >&2; exit 2 ;;
esac
FUZZ_SECONDS=$((minutes * 60)) exec "$(dirname "$0")/tests/fuzz.sh"
