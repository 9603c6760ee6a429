#!/usr/bin/env bash
# Removes a local cluster made by scripts/cluster-up.sh: stops its nodes (by
# the pids it recorded: SIGTERM, then SIGKILL after 30 s), removes their
# records under /run/ballast/api, detaches its loop devices, deletes its
# network namespaces and its directory.
#
#   scripts/cluster-down.sh [--dir DIR]     (default /var/tmp/ballast-cluster)
#   scripts/cluster-down.sh --keep-files    the same, but the directory (node logs,
#                                           data directories, disk images) stays
set -uo pipefail

DIR=/var/tmp/ballast-cluster KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --keep-files) KEEP=1; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster-down: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
STATE=$DIR/state
[ -f "$STATE" ] || { echo "cluster-down: no cluster in $DIR (no $STATE)"; exit 0; }

pids=$(awk '$1 == "pid" {print $2}' "$STATE")
for pid in $pids; do kill -TERM "$pid" 2>/dev/null; done
for pid in $pids; do
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "cluster-down: pid $pid did not stop in 30 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null
  fi
done
# What a node killed with -9 could not remove: its record for the local CLI
# (node::local_nodes), naming a data directory of this cluster.
real_dir=$(realpath "$DIR" 2>/dev/null || echo "$DIR")
for record in /run/ballast/api/*; do
  [ -f "$record" ] || continue
  case "$(cat "$record" 2>/dev/null)" in "$real_dir"/*) rm -f "$record" ;; esac
done
for loop in $(awk '$1 == "loop" {print $2}' "$STATE"); do
  for _ in $(seq 1 20); do losetup -d "$loop" 2>/dev/null && break; sleep 0.2; done
done
# Node namespaces first, the hub last (its bridge holds the veth ends).
for ns in $(awk '$1 == "netns" {print $2}' "$STATE" | sort -r); do
  ip netns del "$ns" 2>/dev/null
done
if [ "$KEEP" = 1 ]; then
  mv "$STATE" "$DIR/state.down"
  echo "cluster-down: stopped the cluster in $DIR; its files stay there"
  exit 0
fi
rm -rf "$DIR"
echo "cluster-down: removed the cluster in $DIR"
