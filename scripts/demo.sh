#!/usr/bin/env bash
# ballast end to end on this machine: builds the static binary, makes two
# loop-device "disks", enrolls them, starts a node, creates volumes, runs
# fio through NBD (random writes with checksums, then reads), kills the node
# with SIGKILL, restarts it, and proves fio's data is intact. Cleans up
# everything it made. Needs root.
#
#   scripts/demo.sh          (about a minute; DEMO_SECONDS sets each fio run's length)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (loop devices, O_DIRECT)"; exit 1; }
ci/install-deps.sh >/dev/null
scripts/build.sh
BALLAST=$PWD/dist/ballast
RUN_SECONDS=${DEMO_SECONDS:-10}
API=127.0.0.1:${DEMO_API_PORT:-9410}
NBD=127.0.0.1:${DEMO_NBD_PORT:-10809}
PEER=127.0.0.1:${DEMO_PEER_PORT:-9411}
export BALLAST_API=http://$API

WORK=$(mktemp -d /var/tmp/ballast-demo.XXXXXX)
LOOPS=()
NODE=""
cleanup() {
  if [ -n "$NODE" ]; then kill -TERM "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; fi
  for loop in "${LOOPS[@]}"; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do losetup -d "$loop" 2>/dev/null && break; sleep 0.2; done
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_node() {
  "$BALLAST" node run --data-dir "$WORK/data" --listen-api "$API" --listen-nbd "$NBD" --listen-peer "$PEER" 2>>"$WORK/node.log" &
  NODE=$!
  for _ in $(seq 1 300); do
    "$BALLAST" node status >/dev/null 2>&1 && return 0
    kill -0 "$NODE" 2>/dev/null || { cat "$WORK/node.log"; echo "demo: node failed to start"; exit 1; }
    sleep 0.1
  done
  echo "demo: node not ready after 30 s"; exit 1
}

fio_job() { # label, then fio options; the job name is fixed so saved verify state matches
  local name=$1; shift
  (cd "$WORK" && fio --name=demo --ioengine=nbd --uri="nbd://$NBD/pg-data" --bs=4k --iodepth=32 --size=512M \
    --verify=crc32c --randrepeat=1 --directory="$WORK" "$@" --output-format=json >"$WORK/$name.json" 2>"$WORK/$name.err") || {
      [ "$name" = write ] || { cat "$WORK/$name.err"; echo "demo: fio $name failed"; exit 1; }; }
  python3 - "$WORK/$name.json" <<'PY'
import json, sys
try:
    text = open(sys.argv[1]).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
except (ValueError, KeyError, IndexError):
    print("  (fio was stopped by its trigger; no summary)")
    sys.exit(0)
for kind in ("write", "read"):
    io = job[kind]
    if io["iops"] >= 1:
        p99 = io["clat_ns"]["percentile"].get("99.000000", 0) / 1000
        print(f"  {kind:5}: {io['io_bytes'] / 2**20:6.0f} MiB, {io['iops']:>9,.0f} IOPS  {io['bw_bytes'] / 2**20:7.1f} MiB/s  p99 {p99:,.0f} us  errors {job['error']}")
PY
}

echo
echo "== two 1 GiB disks (loop devices with direct I/O over fully written files)"
for n in 0 1; do
  dd if=/dev/zero of="$WORK/disk$n.img" bs=8M count=128 oflag=direct status=none
  LOOPS+=("$(losetup --find --show --direct-io=on "$WORK/disk$n.img")")
done
"$BALLAST" disk list | grep -E "DEVICE|$(basename "${LOOPS[0]}")|$(basename "${LOOPS[1]}")"

echo
echo "== enroll them, start a node"
"$BALLAST" disk enroll --data-dir "$WORK/data" "${LOOPS[@]}"
start_node
"$BALLAST" cluster init
"$BALLAST" node status

echo
echo "== create volumes (thin: they use only what is written; spread over the disks)"
"$BALLAST" volume create pg-data --size 2GiB >/dev/null
"$BALLAST" volume create logs --size 8GiB >/dev/null
"$BALLAST" volume list

echo
echo "== fio through NBD: 4 KiB random writes at queue depth 32 for ${RUN_SECONDS}s, every block checksummed"
fio_job write --rw=randwrite --time_based --runtime="$RUN_SECONDS" --do_verify=0 --verify_state_save=1 \
  --trigger-file="$WORK/kill-now" --trigger="kill -9 $NODE" &
FIO=$!
sleep "$(awk "BEGIN {print $RUN_SECONDS / 2}")"
echo "  ... SIGKILL to the node half-way (fio saves what it had acknowledged)"
touch "$WORK/kill-now"
wait "$FIO" 2>/dev/null || true
wait "$NODE" 2>/dev/null || true
NODE=""
ls "$WORK"/*verify.state >/dev/null 2>&1 || { echo "demo: fio saved no verify state"; exit 1; }

echo
echo "== restart the node (replays its logs) and verify every write fio saw acknowledged"
start_node
fio_job verify --rw=randwrite --verify_only --verify_state_load=1 --verify_fatal=1

echo
echo "== 4 KiB random reads at queue depth 32 for ${RUN_SECONDS}s"
fio_job read --rw=randread --time_based --runtime="$RUN_SECONDS" --verify=0

echo
"$BALLAST" volume list
kill -TERM "$NODE"; wait "$NODE" || { echo "demo: node did not stop cleanly"; exit 1; }
NODE=""
echo
echo "demo: ok (node stopped cleanly; cleaning up $WORK and ${LOOPS[*]})"
