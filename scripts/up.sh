#!/usr/bin/env bash
# From nothing to a running cluster on localhost: installs what is missing, builds wasmctl,
# starts the control plane in the background (state in ~/.wasmctl), and applies the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh
. scripts/env.sh
cargo build --locked --bin wasmctl

DATA_DIR="${WASMCTL_DATA_DIR:-$HOME/.wasmctl}"
mkdir -p "$DATA_DIR"
LOG="$DATA_DIR/server.log"
if ! "$WASMCTL_BIN" --kubeconfig "$DATA_DIR/kubeconfig.yaml" version >/dev/null 2>&1; then
  nohup "$WASMCTL_BIN" server --data-dir "$DATA_DIR" >"$LOG" 2>&1 &
  echo $! >"$DATA_DIR/server.pid"
  for _ in $(seq 1 600); do
    "$WASMCTL_BIN" --kubeconfig "$DATA_DIR/kubeconfig.yaml" version >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
export KUBECONFIG="$DATA_DIR/kubeconfig.yaml"
"$WASMCTL_BIN" version
"$WASMCTL_BIN" apply -f manifests/demo.yaml
"$WASMCTL_BIN" get namespaces,deployments,services -A
cat <<MSG

wasmctl is running (pid $(cat "$DATA_DIR/server.pid" 2>/dev/null || echo '?'), log $LOG).
  export KUBECONFIG=$KUBECONFIG
  $WASMCTL_BIN get deploy -n demo        # or: kubectl get deploy -n demo
  kill \$(cat $DATA_DIR/server.pid)      # stop it; running this script again resumes all state
MSG
