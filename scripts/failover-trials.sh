#!/usr/bin/env bash
# Many failovers under a pipelined writer, outside CI: on one local 3-node
# cluster, each trial creates a repl=3 volume, writes random 4 KiB blocks
# with 32 in flight on one NBD connection (`ballast debug nbd-write-load`,
# which logs every acknowledgement), kills the node serving it with SIGKILL
# at a random moment, fails the volume over to another in-sync node, reads
# every touched block back there (`ballast debug nbd-verify-load`), restarts
# the killed node and deletes the volume. Optionally with busy loops taking
# CPU from the nodes (the reordering of completions that fooled fio's saved
# verify state shows up under contention). Stops at the first lost or
# corrupt block and keeps everything (logs, ack log, disks). Needs root.
#
#   scripts/failover-trials.sh [TRIALS] [--hogs N] [--seconds S] [--dir DIR]
#     TRIALS       trials to run (default 20)
#     --hogs N     N busy loops running beside the cluster (default 0)
#     --seconds S  most seconds of writing per trial (default 6; the kill comes at 1..S-1 s)
set -euo pipefail
cd "$(dirname "$0")/.."

TRIALS=20 HOGS=0 SECONDS_MAX=6 DIR=/var/tmp/ballast-failover-trials
while [ $# -gt 0 ]; do
  case "$1" in
    --hogs) HOGS=$2; shift 2 ;;
    --seconds) SECONDS_MAX=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    [0-9]*) TRIALS=$1; shift ;;
    *) echo "failover-trials: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "failover-trials: needs root (loop devices, O_DIRECT)" >&2; exit 1; }
[ "$SECONDS_MAX" -ge 2 ] || { echo "failover-trials: --seconds must be at least 2" >&2; exit 2; }
[ -x dist/ballast ] || scripts/build.sh >&2
BALLAST=$PWD/dist/ballast
CLUSTER=$DIR/cluster
mkdir -p "$DIR"
scripts/cluster-up.sh 3 --dir "$CLUSTER" --ballast "$BALLAST" --disk-size 4GiB >/dev/null
export BALLAST_TOKEN_FILE=$CLUSTER/node1/data/admin.token
HOG_PIDS=()
FAILED=0
cleanup() {
  for pid in "${HOG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "$FAILED" = 1 ]; then
    scripts/cluster-down.sh --dir "$CLUSTER" --keep-files >/dev/null
    echo "failover-trials: kept for a look: $DIR" >&2
  else
    scripts/cluster-down.sh --dir "$CLUSTER" >/dev/null
    rm -rf "$DIR"
  fi
}
trap cleanup EXIT
for _ in $(seq 1 "$HOGS"); do (while :; do :; done) & HOG_PIDS+=($!); done

# The pid of node i: the last one recorded for it (restarts append).
PIDS=()
i=0
for pid in $(awk '$1 == "pid" {print $2}' "$CLUSTER/state"); do i=$((i + 1)); PIDS[$i]=$pid; done
api() { echo "http://127.0.0.$1:9410"; }
# shellcheck source=lib/cluster-node.sh
. scripts/lib/cluster-node.sh
# Runs a CLI command against the first node that answers it.
any_node() {
  local i
  for i in 1 2 3; do BALLAST_API=$(api "$i") "$@" 2>/dev/null && return 0; done
  return 1
}

acked_total=0 unacked_total=0 started=$(date +%s)
for trial in $(seq 1 "$TRIALS"); do
  volume=t$trial
  work=$DIR/t$trial
  mkdir -p "$work"
  # Created through each node in turn: the node asked coordinates the volume.
  BALLAST_API=$(api $(( trial % 3 + 1 ))) "$BALLAST" volume create "$volume" --size 1GiB --repl 3 >/dev/null
  coordinator=$(any_node "$BALLAST" volume inspect "$volume" | sed -n 's#^export: *nbd://127\.0\.0\.\([0-9]\)[:/].*#\1#p')
  target=$(( coordinator % 3 + 1 ))
  kill_ms=$(( 1000 + RANDOM % ((SECONDS_MAX - 1) * 1000) ))
  ( sleep "$((kill_ms / 1000)).$(printf '%03d' $((kill_ms % 1000)))"; kill -9 "${PIDS[$coordinator]}" ) &
  killer=$!
  "$BALLAST" debug nbd-write-load --uri "nbd://127.0.0.$coordinator:10809/$volume" --ack-log "$work/ack.log" \
    --seconds "$SECONDS_MAX" --queue-depth 32 --seed "$trial" >"$work/write.out"
  wait "$killer" || true
  for _ in $(seq 1 100); do kill -0 "${PIDS[$coordinator]}" 2>/dev/null || break; sleep 0.1; done
  attached=0
  for _ in $(seq 1 120); do
    if BALLAST_API=$(api "$target") "$BALLAST" volume attach "$volume" --force >"$work/attach.out" 2>&1; then attached=1; break; fi
    sleep 0.5
  done
  [ "$attached" = 1 ] || { cat "$work/attach.out"; echo "failover-trials: trial $trial: node$target could not take $volume over" >&2; FAILED=1; exit 1; }
  if ! "$BALLAST" debug nbd-verify-load --uri "nbd://127.0.0.$target:10809/$volume" --ack-log "$work/ack.log" >"$work/verify.out"; then
    cat "$work/write.out" "$work/verify.out"
    echo "failover-trials: trial $trial: an acknowledged write is missing or corrupt" >&2
    FAILED=1; exit 1
  fi
  acked=$(awk '{print $2}' "$work/write.out")
  unacked=$(grep -o '([0-9]* blocks hold a later write' "$work/verify.out" | tr -dc 0-9)
  acked_total=$((acked_total + acked)); unacked_total=$((unacked_total + unacked))
  echo "trial $trial: node$coordinator killed at ${kill_ms} ms, node$target took over; $(sed 's/^nbd-verify-load: nbd:[^ ]*: //' "$work/verify.out")"
  PIDS[$coordinator]=$(restart_cluster_node "$BALLAST" "$CLUSTER" "$coordinator") || { FAILED=1; exit 1; }
  BALLAST_API=$(api "$target") "$BALLAST" volume delete "$volume" >/dev/null
  rm -rf "$work"
done
echo "failover-trials: $TRIALS trials in $(( $(date +%s) - started )) s (hogs $HOGS): $acked_total acknowledged writes checked, 0 lost, 0 corrupt; $unacked_total blocks held a write whose reply never came"
