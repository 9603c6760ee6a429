#!/usr/bin/env bash
# Builds ballast as a Docker managed plugin and creates it in the local
# Docker engine (no registry: `docker plugin create` from a directory).
# The plugin's rootfs holds the ballast binary and the tools `volume mount`
# runs (mkfs.ext4/mkfs.xfs, blkid, mount, umount, losetup) with the shared
# libraries they need, copied from this host; config.json asks for host
# networking, all devices (/dev bound from the host: the disks, loop and
# FUSE), CAP_SYS_ADMIN (mounts), CAP_IPC_LOCK and CAP_SYS_RESOURCE (the
# node keeps its memory resident), and propagates /mnt/volumes to the host.
# Nothing else runs on the host: `docker plugin enable` starts the node and
# the volume plugin (`ballast plugin managed`).
#
#   scripts/docker-plugin.sh [--name NAME] [--binary PATH] [--dir DIR] [--docker-host URL]
#
# then, for a one-node cluster on /dev/nvme1n1 (data kept in /var/lib/ballast):
#   docker plugin set NAME DISKS=/dev/nvme1n1 INIT=single
#   docker plugin enable NAME
#   docker volume create -d NAME --opt size=10GiB pgdata
#   docker run -v pgdata:/var/lib/postgresql/data postgres
# Settings (docker plugin set NAME KEY=VALUE, while disabled): DISKS
# (comma-separated, enrolled at start unless enrolled already), INIT
# (single, or empty to join a cluster by hand), LISTEN_API, LISTEN_NBD,
# LISTEN_PEER, data.source (the host directory holding the node's data,
# default /var/lib/ballast).
# Options:
#   --name NAME        plugin name (default ballast)
#   --binary PATH      the ballast binary (default dist/ballast, built by scripts/build.sh if missing)
#   --dir DIR          where the plugin directory is made (default: a temporary one, removed after)
#   --docker-host URL  the engine to create it in (default: docker's own default)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=ballast BINARY="" DIR="" HOST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --docker-host) HOST_ARGS=(-H "$2"); shift 2 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "docker-plugin: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v docker >/dev/null || { echo "docker-plugin: docker is not installed" >&2; exit 1; }
if [ -z "$BINARY" ]; then
  BINARY=dist/ballast
  [ -x "$BINARY" ] || scripts/build.sh
fi
[ -x "$BINARY" ] || { echo "docker-plugin: $BINARY is not an executable ballast binary" >&2; exit 1; }
"$BINARY" plugin managed --help >/dev/null 2>&1 ||
  { echo "docker-plugin: $BINARY has no 'plugin managed' command (an older build?)" >&2; exit 1; }

CLEANUP=""
if [ -z "$DIR" ]; then
  DIR=$(mktemp -d /var/tmp/ballast-plugin.XXXXXX)
  CLEANUP=$DIR
fi
trap '[ -z "$CLEANUP" ] || rm -rf "$CLEANUP"' EXIT
ROOTFS=$DIR/rootfs
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"/{dev,proc,sys,tmp,etc,run/docker/plugins,mnt/volumes,var/lib/ballast}

# A program and the shared libraries it loads, at the same paths as here.
copy_with_libs() {
  local program=$1 lib
  mkdir -p "$ROOTFS$(dirname "$program")"
  cp -L "$program" "$ROOTFS$program"
  for lib in $(ldd "$program" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$ROOTFS$lib" ] && continue
    mkdir -p "$ROOTFS$(dirname "$lib")"
    cp -L "$lib" "$ROOTFS$lib"
  done
}

cp -L "$BINARY" "$ROOTFS/ballast"
for lib in $(ldd "$BINARY" 2>/dev/null | grep -o '/[^ ]*' || true); do
  mkdir -p "$ROOTFS$(dirname "$lib")"; cp -L "$lib" "$ROOTFS$lib"
done
for tool in mkfs.ext4 mke2fs mkfs.xfs blkid mount umount losetup; do
  path=$(command -v "$tool" || true)
  if [ -n "$path" ]; then
    copy_with_libs "$path"
  elif [ "$tool" != mkfs.xfs ]; then
    echo "docker-plugin: $tool is missing on this host (install e2fsprogs, util-linux)" >&2; exit 1
  fi
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOTFS/etc/"
: > "$ROOTFS/etc/mtab"

# CAP_SYS_RESOURCE (the node as an I/O flusher, PR_SET_IO_FLUSHER) only
# where this host may grant it: asking for a capability outside the
# engine's bounding set makes `docker plugin enable` fail (some sandboxes).
CAPS='"CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_MKNOD", "CAP_DAC_OVERRIDE"'
bounding=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
if (( (16#$bounding >> 24) & 1 )); then
  CAPS="$CAPS, \"CAP_SYS_RESOURCE\""
else
  echo "docker-plugin: this host withholds CAP_SYS_RESOURCE; the plugin runs without it (no PR_SET_IO_FLUSHER)" >&2
fi
cat > "$DIR/config.json" <<JSON
{
  "description": "ballast: replicated block volumes for containers",
  "documentation": "https://github.com/ballast/ballast#docker",
  "entrypoint": ["/ballast", "plugin", "managed"],
  "interface": { "types": ["docker.volumedriver/1.0"], "socket": "ballast.sock" },
  "network": { "type": "host" },
  "propagatedmount": "/mnt/volumes",
  "ipchost": false,
  "pidhost": false,
  "linux": {
    "capabilities": [$CAPS],
    "allowalldevices": true,
    "devices": []
  },
  "mounts": [
    { "name": "dev", "description": "the host's devices: the disks, loop devices, /dev/fuse",
      "source": "/dev", "destination": "/dev", "type": "bind", "options": ["rbind", "rw"] },
    { "name": "sys", "description": "sysfs, writable: the node turns off the loop devices' write-back cache (one FUSE round trip less per fsync)",
      "source": "/sys", "destination": "/sys", "type": "bind", "options": ["rbind", "rw"] },
    { "name": "data", "description": "the node's data directory on the host", "settable": ["source"],
      "source": "/var/lib/ballast", "destination": "/var/lib/ballast", "type": "bind", "options": ["rbind", "rw"] }
  ],
  "env": [
    { "name": "DISKS", "description": "disks to enroll, comma-separated", "settable": ["value"], "value": "" },
    { "name": "INIT", "description": "single: a one-node cluster; empty: join one by hand", "settable": ["value"], "value": "single" },
    { "name": "LISTEN_API", "settable": ["value"], "value": "127.0.0.1:9410" },
    { "name": "LISTEN_NBD", "settable": ["value"], "value": "127.0.0.1:10809" },
    { "name": "LISTEN_PEER", "settable": ["value"], "value": "127.0.0.1:9411" },
    { "name": "RUST_LOG", "settable": ["value"], "value": "info" }
  ]
}
JSON

docker "${HOST_ARGS[@]}" plugin create "$NAME" "$DIR"
echo "created plugin $NAME ($(du -sh "$ROOTFS" | cut -f1) rootfs); next:"
echo "  mkdir -p /var/lib/ballast   # the node's data on the host (or: docker plugin set $NAME data.source=DIR)"
echo "  docker plugin set $NAME DISKS=/dev/DISK && docker plugin enable $NAME"
