#!/usr/bin/env bash
# ballast end to end on this machine: builds the static binary, starts a
# 3-node cluster on loop-device disks (scripts/cluster-up.sh), creates a
# repl=3 volume, writes to it through NBD (random 4 KiB writes, 32 in flight,
# each copied synchronously to all three nodes, every write sent and every
# acknowledgement logged), kills the serving node with SIGKILL mid-write,
# fails the volume over to another node and proves every acknowledged write
# is there (and in a snapshot's clone); then reads with fio and shows the
# cluster still creating and inspecting volumes with a node down. Cleans up
# everything it made; when it fails, it keeps the node logs, the ack log and
# the disks and says where. Needs root.
#
#   scripts/demo.sh          (about a minute; DEMO_SECONDS sets each load's length)
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (loop devices, O_DIRECT)"; exit 1; }
ci/install-deps.sh --demo >/dev/null
scripts/build.sh
BALLAST=$PWD/dist/ballast
RUN_SECONDS=${DEMO_SECONDS:-10}
WORK=$(mktemp -d /var/tmp/ballast-demo.XXXXXX)
CLUSTER=$WORK/cluster
NBD=127.0.0.1:10809
export BALLAST_API=http://127.0.0.1:9410
# Once the cluster is formed every node's admin token is cluster-signed:
# node 1's works against any node (node 2's would too).
export BALLAST_TOKEN_FILE=$CLUSTER/node1/data/admin.token
cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -e "$CLUSTER/state" ]; then
    scripts/cluster-down.sh --dir "$CLUSTER" --keep-files >/dev/null || true
    echo "demo: failed; kept for a look: $WORK (ack.log, cluster/node*/node.log, the disks cluster/node*/disk0.img)" >&2
  else
    scripts/cluster-down.sh --dir "$CLUSTER" >/dev/null || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# shellcheck source=lib/cluster-node.sh
. scripts/lib/cluster-node.sh
node_pid() { awk -v n="$1" '$1 == "pid" {i++; if (i == n) print $2}' "$CLUSTER/state"; }

fio_job() { # label, then fio options
  local name=$1; shift
  fio --name=demo --ioengine=nbd --uri="nbd://${NBD:?}/pg-data" --bs=4k --iodepth=32 --size=512M \
    "$@" --output-format=json >"$WORK/$name.json" 2>"$WORK/$name.err" || { cat "$WORK/$name.err"; echo "demo: fio $name failed"; exit 1; }
  python3 - "$WORK/$name.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # fio's nbd engine prints a line before the JSON
job = json.loads(text[text.index("{"):])["jobs"][0]
for kind in ("write", "read"):
    io = job[kind]
    if io["iops"] >= 1:
        p99 = io["clat_ns"]["percentile"].get("99.000000", 0) / 1000
        print(f"  {kind:5}: {io['io_bytes'] / 2**20:6.0f} MiB, {io['iops']:>9,.0f} IOPS  {io['bw_bytes'] / 2**20:7.1f} MiB/s  p99 {p99:,.0f} us  errors {job['error']}")
PY
}
verify() { # export: every acknowledged write of the load must be there
  "$BALLAST" debug nbd-verify-load --uri "nbd://$1" --ack-log "$WORK/ack.log" | sed 's/^nbd-verify-load: /  /' ||
    { echo "demo: an acknowledged write is missing or corrupt on $1"; exit 1; }
}

echo
echo "== a 3-node cluster on this host (each node: its own loop-device disk and 127.0.0.x address)"
scripts/cluster-up.sh 3 --dir "$CLUSTER" --ballast "$BALLAST" | sed -n '1,4p'
"$BALLAST" status

echo
echo "== a repl=3 volume (thin: it uses only what is written; a replica on each node)"
"$BALLAST" volume create pg-data --size 2GiB --repl 3
NODE=$(node_pid 1)

echo
echo "== random 4 KiB writes through NBD, 32 in flight, for up to ${RUN_SECONDS}s; each block says which write it is"
echo "   (the writer logs every write it sends and every acknowledgement it gets)"
( sleep "$(awk "BEGIN {print $RUN_SECONDS / 2}")"
  echo "  ... SIGKILL to node1, which serves the volume, half-way"
  kill -9 "$NODE" ) &
KILLER=$!
"$BALLAST" debug nbd-write-load --uri "nbd://$NBD/pg-data" --ack-log "$WORK/ack.log" --seconds "$RUN_SECONDS" \
  --queue-depth 32 --blocks 131072 | sed 's/^nbd-write-load: /  /'
wait "$KILLER"
for _ in $(seq 1 100); do kill -0 "$NODE" 2>/dev/null || break; sleep 0.1; done

echo
echo "== node1 is gone: node2 takes the volume over (an in-sync replica; the epoch goes up, fencing node1)"
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" volume attach pg-data --force | grep -E '^(attached|in sync|coordinator|export)'
NBD=127.0.0.2:10809

echo
echo "== read back on node2 every block the writer touched: each must hold its newest acknowledged write"
verify 127.0.0.2:10809/pg-data

echo
echo "== a snapshot (instant: no data copied; on every in-sync replica) and a writable clone of it"
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" snapshot create pg-data after-failover
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" volume clone pg-data@after-failover pg-test | grep -E '^(cloned|cloned from|replicas|export)'
echo "  ... the clone holds every acknowledged write too"
verify "$(BALLAST_API=http://127.0.0.2:9410 "$BALLAST" volume inspect pg-test | awk '$1 == "export:" {sub("nbd://", "", $2); print $2}')"

echo
echo "== with node1 down, the other two still change metadata (Raft majority)"
sleep 3  # status calls a node down after 5 s of silence
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" volume create scratch --size 1GiB --repl 2 >/dev/null
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" status | sed -n '1,6p'

echo
echo "== node1 returns (replays its log, catches up with the cluster; its replica of pg-data is stale until resync)"
restart_cluster_node "$BALLAST" "$CLUSTER" 1 >/dev/null || { echo "demo: node1 did not come back"; exit 1; }

echo
echo "== 4 KiB random reads at queue depth 32 for ${RUN_SECONDS}s"
fio_job read --rw=randread --time_based --runtime="$RUN_SECONDS"

echo
echo "== kill -9 node3: volumes can still be created and inspected"
kill -9 "$(node_pid 3)"
sleep 3  # placement only uses nodes that answered in the last 2.5 s
BALLAST_API=http://127.0.0.2:9410 "$BALLAST" volume create after-loss --size 1GiB --repl 2 >/dev/null
"$BALLAST" volume inspect after-loss | grep -E '^(name|replicas|in sync|coordinator|export):'
sleep 3  # status calls a node down after 5 s of silence
"$BALLAST" status
echo
echo "demo: ok (cleaning up the cluster, its loop devices and $WORK)"
