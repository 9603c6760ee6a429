#!/usr/bin/env bash
# The storage engine, end to end, on this machine: builds the static binary,
# makes two loop-device "disks", enrolls them, writes through io_uring while
# the writer is killed with SIGKILL, proves every acknowledged write is
# intact, and shows the disks. Cleans up everything it made. Needs root.
#
#   scripts/demo.sh              (about a minute; set DEMO_SECONDS to change the load)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (loop devices, O_DIRECT)"; exit 1; }
ci/install-deps.sh >/dev/null
scripts/build.sh
BALLAST=$PWD/dist/ballast
SECONDS_LOAD=${DEMO_SECONDS:-5}

WORK=$(mktemp -d /var/tmp/ballast-demo.XXXXXX)
LOOPS=()
WRITER=""
cleanup() {
  [ -n "$WRITER" ] && kill -9 "$WRITER" 2>/dev/null || true
  for loop in "${LOOPS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do losetup -d "$loop" 2>/dev/null && break; sleep 0.2; done
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo
echo "== two 1 GiB disks (loop devices with direct I/O over fully written files)"
for n in 0 1; do
  dd if=/dev/zero of="$WORK/disk$n.img" bs=8M count=128 oflag=direct status=none
  LOOPS+=("$(losetup --find --show --direct-io=on "$WORK/disk$n.img")")
done
"$BALLAST" disk list | grep -E "DEVICE|$(basename "${LOOPS[0]}")|$(basename "${LOOPS[1]}")"

echo
echo "== enroll them"
"$BALLAST" disk enroll --data-dir "$WORK/data" "${LOOPS[@]}"

echo
echo "== random 4 KiB writes through io_uring for ${SECONDS_LOAD}s; killed with SIGKILL half-way"
"$BALLAST" --log-level warn debug write-load --data-dir "$WORK/data" --ack-log "$WORK/acks" \
  --blocks 100000 --seconds "$SECONDS_LOAD" --run 1 &
WRITER=$!
sleep "$(awk "BEGIN {print $SECONDS_LOAD / 2}")"
kill -9 "$WRITER"; wait "$WRITER" 2>/dev/null || true; WRITER=""
echo "writer killed after $(( $(stat -c %s "$WORK/acks") / 16 )) acknowledged writes"

echo
echo "== reopen (replay the log) and check every acknowledged write"
"$BALLAST" --log-level warn debug verify-load --data-dir "$WORK/data" --ack-log "$WORK/acks" --blocks 100000

echo
echo "== a clean run on the second disk, then the same check"
"$BALLAST" --log-level warn debug write-load --data-dir "$WORK/data" --disk 1 --ack-log "$WORK/acks1" \
  --blocks 100000 --seconds "$SECONDS_LOAD" --run 1
"$BALLAST" --log-level warn debug verify-load --data-dir "$WORK/data" --disk 1 --ack-log "$WORK/acks1" --blocks 100000

echo
echo "== the disks now"
"$BALLAST" --log-level warn disk status --data-dir "$WORK/data"
echo
echo "demo: ok (cleaning up $WORK and ${LOOPS[*]})"
