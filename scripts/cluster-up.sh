#!/usr/bin/env bash
# Starts a local ballast cluster of N nodes on this host: each node gets its
# own loop-device disk, data directory and address, the first one starts the
# cluster and the others join it with a token. Prints how to reach each node.
# `scripts/cluster-down.sh` removes everything this made (processes by pid,
# loop devices, namespaces, files). Needs root.
#
#   scripts/cluster-up.sh [N]                 N nodes (default 3) on 127.0.0.1 .. 127.0.0.N
#   scripts/cluster-up.sh 3 --netns           each node in its own network namespace, joined by veth
#                                             to a bridge (addresses 10.213.0.1 .. N, inside the namespaces)
# NBD: nodes accept plaintext nbd:// on loopback (--nbd-tls plaintext-on-loopback);
# with --netns their NBD listeners are not loopback, so clients need nbds://.
# Options:
#   --dir DIR          where the cluster lives (default /var/tmp/ballast-cluster)
#   --disk-size SIZE   size of each node's disk (default 2GiB)
#   --label-zones      label node i with zone=z<i> (placement spreads over zones)
#   --ballast PATH     the binary (default: dist/ballast, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

N=3 NETNS=0 DIR=/var/tmp/ballast-cluster DISK_SIZE=2GiB ZONES=0 BALLAST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --netns) NETNS=1; shift ;;
    --dir) DIR=$2; shift 2 ;;
    --disk-size) DISK_SIZE=$2; shift 2 ;;
    --label-zones) ZONES=1; shift ;;
    --ballast) BALLAST=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    [0-9]*) N=$1; shift ;;
    *) echo "cluster-up: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "cluster-up: needs root (loop devices, O_DIRECT${NETNS:+, namespaces})" >&2; exit 1; }
[ "$N" -ge 1 ] && [ "$N" -le 9 ] || { echo "cluster-up: N must be 1 to 9" >&2; exit 2; }
if [ -e "$DIR/state" ]; then
  echo "cluster-up: a cluster already lives in $DIR; remove it with scripts/cluster-down.sh --dir $DIR" >&2
  exit 1
fi
if [ -z "$BALLAST" ]; then
  [ -x dist/ballast ] || scripts/build.sh >&2
  BALLAST=$PWD/dist/ballast
fi
mkdir -p "$DIR"
STATE=$DIR/state
: >"$STATE"
# On any failure, undo what was made so far.
trap 'echo "cluster-up: failed; cleaning up" >&2; scripts/cluster-down.sh --dir "$DIR" >&2' ERR

TAG=$(printf '%04x' $(( $$ & 0xffff )))
HUB=""
if [ "$NETNS" = 1 ]; then
  HUB=blst-$TAG-hub
  ip netns add "$HUB"; echo "netns $HUB" >>"$STATE"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
fi

host_of() { if [ "$NETNS" = 1 ]; then echo "10.213.0.$1"; else echo "127.0.0.$1"; fi; }
in_ns() { local i=$1; shift; if [ "$NETNS" = 1 ]; then ip netns exec "blst-$TAG-n$i" "$@"; else "$@"; fi; }

for i in $(seq 1 "$N"); do
  node_dir=$DIR/node$i
  mkdir -p "$node_dir"
  truncate -s "$DISK_SIZE" "$node_dir/disk0.img"
  loop=$(losetup --find --show --direct-io=on "$node_dir/disk0.img")
  echo "loop $loop" >>"$STATE"
  "$BALLAST" disk enroll --data-dir "$node_dir/data" "$loop" >"$node_dir/enroll.log"
  host=$(host_of "$i")
  if [ "$NETNS" = 1 ]; then
    ns=blst-$TAG-n$i
    ip netns add "$ns"; echo "netns $ns" >>"$STATE"
    ip -n "$HUB" link add "veth$i" type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set "veth$i" master br0 up
    ip -n "$ns" addr add "$host/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
  labels=()
  [ "$ZONES" = 1 ] && labels=(--label "zone=z$i")
  prefix=()
  [ "$NETNS" = 1 ] && prefix=(ip netns exec "blst-$TAG-n$i")
  # Started directly (ip netns exec execs), so $! is the node's own pid.
  "${prefix[@]}" "$BALLAST" node run --data-dir "$node_dir/data" --name "node$i" "${labels[@]}" --nbd-tls plaintext-on-loopback \
    --listen-api "$host:9410" --listen-nbd "$host:10809" --listen-peer "$host:9411" \
    </dev/null >"$node_dir/node.log" 2>&1 &
  echo "pid $!" >>"$STATE"
  echo "node $i $host" >>"$STATE"
done

api() { echo "http://$(host_of "$1"):9410"; }
# Each node's CLI calls use that node's admin API token (written at start).
as_admin() { local i=$1; shift; BALLAST_TOKEN_FILE="$DIR/node$i/data/admin.token" in_ns "$i" "$@"; }
for i in $(seq 1 "$N"); do
  for _ in $(seq 1 300); do
    as_admin "$i" "$BALLAST" node status --api "$(api "$i")" >/dev/null 2>&1 && break
    sleep 0.1
  done
  as_admin "$i" "$BALLAST" node status --api "$(api "$i")" >/dev/null || { cat "$DIR/node$i/node.log" >&2; false; }
done

as_admin 1 "$BALLAST" cluster init --api "$(api 1)" >/dev/null
for i in $(seq 2 "$N"); do
  token=$(as_admin 1 "$BALLAST" cluster token create --ttl 10m --api "$(api 1)")
  as_admin "$i" "$BALLAST" cluster join "$(host_of 1):9411" --token "$token" --api "$(api "$i")" >/dev/null
done
# Wait until every node sees every other one up.
for _ in $(seq 1 100); do
  down=$(as_admin 1 "$BALLAST" cluster status --json --api "$(api 1)" | grep -c '"up": false' || true)
  [ "$down" = 0 ] && break
  sleep 0.2
done
trap - ERR

echo "cluster-up: $N nodes in $DIR$([ "$NETNS" = 1 ] && echo " (network namespaces blst-$TAG-n1..n$N)")"
for i in $(seq 1 "$N"); do
  host=$(host_of "$i")
  prefix=""
  [ "$NETNS" = 1 ] && prefix="ip netns exec blst-$TAG-n$i "
  echo "  node$i  api http://$host:9410  nbd nbd://$host:10809/<volume>  peer $host:9411  log $DIR/node$i/node.log"
  [ "$i" = 1 ] && first_prefix=$prefix
done
echo
echo "try:"
echo "  ${first_prefix}env BALLAST_API=$(api 1) BALLAST_TOKEN_FILE=$DIR/node1/data/admin.token $BALLAST status"
echo "  ${first_prefix}env BALLAST_API=$(api 1) BALLAST_TOKEN_FILE=$DIR/node1/data/admin.token $BALLAST volume create data --size 1GiB --repl $(( N < 3 ? N : 3 ))"
echo "  scripts/cluster-down.sh --dir $DIR"
