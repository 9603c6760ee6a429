#!/usr/bin/env bash
# Torture trials with a checker (node/tests/torture.rs): a local 3-node
# cluster, a repl=3 volume per trial, a writer through NBD recording every
# acknowledged write, one or two seeded faults per trial (kill -9 of the
# coordinator or a replica, a kill during resync, SIGSTOP/SIGCONT, an
# iptables partition, a forced failover, a disk failing with EIO, bit rot
# in a disk file, full disks); then every written block is
# checked on the coordinator and again on another replica. Ends with
#   trials: N, faults: F, acked writes checked: W, lost: 0, corrupt: 0
# The same seed repeats the same fault schedule. Needs root.
#
#   scripts/torture.sh [--trials N] [--seed S]     (defaults: 20, the time)
set -euo pipefail

trials=20
seed=$(date +%s)
while [ $# -gt 0 ]; do
  case "$1" in
    --trials) trials=${2:?--trials needs a number}; shift 2 ;;
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "torture: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$trials$seed" in *[!0-9]*) echo "torture: --trials and --seed take whole numbers" >&2; exit 2 ;; esac
if [ "$(id -u)" -ne 0 ]; then
  echo "torture: needs root (loop devices, iptables)" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
echo "torture: $trials trials, seed $seed"
BALLAST_TORTURE_TRIALS=$trials BALLAST_TORTURE_SEED=$seed \
  exec cargo test --locked -p node --test torture -- --nocapture --test-threads=1
