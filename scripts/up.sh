#!/usr/bin/env bash
# From nothing to a running cluster on localhost: installs what is missing, builds wasmctl and
# the guest components, starts `wasmctl up` (control plane + node agent, state in ~/.wasmctl)
# in the background, pushes the hello component and runs the demo pod, then calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh
. scripts/env.sh
cargo build --locked --bin wasmctl
(cd wasi-apps && cargo build --locked --release --target wasm32-wasip2)
APPS="$PWD/wasi-apps/target/wasm32-wasip2/release"

DATA_DIR="${WASMCTL_DATA_DIR:-$HOME/.wasmctl}"
mkdir -p "$DATA_DIR"
LOG="$DATA_DIR/wasmctl.log"
export KUBECONFIG="$DATA_DIR/kubeconfig.yaml"
if ! "$WASMCTL_BIN" version >/dev/null 2>&1; then
  nohup "$WASMCTL_BIN" up --data-dir "$DATA_DIR" --name node-1 >"$LOG" 2>&1 &
  echo $! >"$DATA_DIR/wasmctl.pid"
  for _ in $(seq 1 600); do
    "$WASMCTL_BIN" version >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
"$WASMCTL_BIN" version
"$WASMCTL_BIN" push "$APPS/hello.wasm" hello:v1
"$WASMCTL_BIN" apply -f manifests/demo-pod.yaml
IP=""
for _ in $(seq 1 600); do
  IP=$("$WASMCTL_BIN" get pod hello -o json | sed -n 's/.*"podIP": *"\([0-9.]*\)".*/\1/p')
  [ -n "$IP" ] && curl -sf "http://$IP:8080/" >/dev/null 2>&1 && break
  sleep 0.1
done
"$WASMCTL_BIN" get nodes,pods -A -o wide
echo "GET http://$IP:8080/ -> $(curl -s "http://$IP:8080/")"
cat <<MSG

wasmctl is running (pid $(cat "$DATA_DIR/wasmctl.pid" 2>/dev/null || echo '?'), log $LOG).
  export KUBECONFIG=$KUBECONFIG
  $WASMCTL_BIN get pods -o wide          # or: kubectl get pods -o wide
  $WASMCTL_BIN logs hello -f
  kill \$(cat $DATA_DIR/wasmctl.pid)     # stop it (pods stop cleanly); running this script again resumes all state
MSG
