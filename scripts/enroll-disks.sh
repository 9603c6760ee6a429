#!/usr/bin/env bash
# Enrolls every eligible, unused disk of this host into a node's data
# directory. Dry run by default: prints what it would enroll and why other
# disks are left alone. `--yes` enrolls.
#
#   scripts/enroll-disks.sh --data-dir /var/lib/ballast            # dry run
#   scripts/enroll-disks.sh --data-dir /var/lib/ballast --yes      # enroll
#
# Options:
#   --data-dir DIR      the node's data directory (required)
#   --yes               act (default: dry run)
#   --include-loop      also enroll loop devices (off: on real hosts they are snaps and images)
#   --exclude REGEX     skip devices whose path matches REGEX (e.g. '^/dev/sda$')
#   --segment-size SIZE passed to `ballast disk enroll`
#   --ballast PATH      the ballast binary (default: ballast on PATH, else dist/ballast)
set -euo pipefail

DATA_DIR="" YES=0 INCLUDE_LOOP=0 EXCLUDE="" SEGMENT_SIZE="" BALLAST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --yes) YES=1; shift ;;
    --include-loop) INCLUDE_LOOP=1; shift ;;
    --exclude) EXCLUDE=$2; shift 2 ;;
    --segment-size) SEGMENT_SIZE=$2; shift 2 ;;
    --ballast) BALLAST=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "enroll-disks: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA_DIR" ] || { echo "enroll-disks: --data-dir is required (see --help)" >&2; exit 2; }
if [ -z "$BALLAST" ]; then
  if command -v ballast >/dev/null 2>&1; then BALLAST=ballast
  else BALLAST="$(dirname "$0")/../dist/ballast"; fi
fi
[ -x "$BALLAST" ] || command -v "$BALLAST" >/dev/null 2>&1 || { echo "enroll-disks: no ballast binary (build it: scripts/build.sh)" >&2; exit 2; }

echo "All block devices:"
"$BALLAST" disk list
echo
chosen=()
while IFS= read -r device; do
  [ -n "$device" ] || continue
  if [ "$INCLUDE_LOOP" -eq 0 ] && [[ "$device" == /dev/loop* ]]; then
    echo "skip $device: loop device (use --include-loop)"; continue
  fi
  if [ -n "$EXCLUDE" ] && [[ "$device" =~ $EXCLUDE ]]; then
    echo "skip $device: matches --exclude"; continue
  fi
  chosen+=("$device")
done < <("$BALLAST" disk list --eligible)

if [ "${#chosen[@]}" -eq 0 ]; then
  echo "no eligible unused disks to enroll"
  exit 0
fi
if [ "$YES" -eq 0 ]; then
  echo "would enroll into $DATA_DIR: ${chosen[*]}"
  echo "(dry run; rerun with --yes to format them)"
  exit 0
fi
args=(disk enroll --data-dir "$DATA_DIR")
[ -n "$SEGMENT_SIZE" ] && args+=(--segment-size "$SEGMENT_SIZE")
"$BALLAST" "${args[@]}" "${chosen[@]}"
