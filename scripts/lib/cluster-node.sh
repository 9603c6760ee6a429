# Sourced by scripts that restart a node of a cluster made by
# scripts/cluster-up.sh (loopback layout: node i on 127.0.0.i).
#
# restart_cluster_node BALLAST DIR I: starts node I of the cluster in DIR
# again with the arguments cluster-up.sh gave it, its log appended to
# DIR/nodeI/node.log and its pid recorded in DIR/state (so
# cluster-down.sh stops it); waits until its API answers (at most 30 s).
# Prints the pid. Started from a subshell, so it is no job of the caller's
# shell (no "Killed" notice when the caller kills it later).
restart_cluster_node() {
  local ballast=$1 dir=$2 i=$3 host="127.0.0.$3" pid
  ( "$ballast" node run --data-dir "$dir/node$i/data" --name "node$i" --nbd-tls plaintext-on-loopback \
      --listen-api "$host:9410" --listen-nbd "$host:10809" --listen-peer "$host:9411" \
      </dev/null >>"$dir/node$i/node.log" 2>&1 &
    echo "pid $!" >>"$dir/state" )
  pid=$(awk '$1 == "pid" {pid = $2} END {print pid}' "$dir/state")
  for _ in $(seq 1 300); do
    if BALLAST_TOKEN_FILE="$dir/node$i/data/admin.token" "$ballast" node status --api "http://$host:9410" >/dev/null 2>&1; then
      echo "$pid"
      return 0
    fi
    sleep 0.1
  done
  echo "node$i not ready after 30 s (log: $dir/node$i/node.log)" >&2
  return 1
}
