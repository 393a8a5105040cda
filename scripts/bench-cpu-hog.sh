#!/usr/bin/env bash
# Isolation benchmark: the latency of a healthy `hello` pod while CPU hogs run on the same node.
# One wrk connection, requests back to back (latency, not saturation), 10 s per case:
# baseline; one cpu-hog limited to 200m; two unlimited cpu-hogs (one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
cargo build --locked --bin wasmctl
(cd wasi-apps && cargo build --locked --release --target wasm32-wasip2)
APPS="$PWD/wasi-apps/target/wasm32-wasip2/release"
WORK=$(mktemp -d)
UP_PID=
cleanup() { [ -z "$UP_PID" ] || { kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; }; rm -rf "$WORK"; }
trap cleanup EXIT
"$WASMCTL_BIN" up --data-dir "$WORK" --listen 127.0.0.1:0 --name node-1 --kubelet-port 0 \
  --pod-cidr 127.76.0.0/16 >"$WORK/up.out" 2>"$WORK/up.log" &
UP_PID=$!
for _ in $(seq 1 600); do grep -q "API server listening" "$WORK/up.out" 2>/dev/null && break; sleep 0.1; done
W() { "$WASMCTL_BIN" --kubeconfig "$WORK/kubeconfig.yaml" "$@"; }
W push "$APPS/hello.wasm" hello:v1 >/dev/null
W push "$APPS/cpu-hog.wasm" cpu-hog:v1 >/dev/null
pod() { # NAME IMAGE [CPU_LIMIT]
  local limits=""
  [ -z "${3:-}" ] || limits="resources: {limits: {cpu: $3}}"
  W apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  nodeName: node-1
  containers:
  - name: c
    image: $2
    ports: [{containerPort: 8080}]
    $limits
YAML
  for _ in $(seq 1 600); do
    case "$(W get pod "$1" -o json)" in *'"phase": "Running"'*) return 0 ;; esac
    sleep 0.05
  done
  echo "pod $1 did not start" >&2; exit 1
}
pod hello hello:v1
IP=$(W get pod hello -o json | sed -n 's/.*"podIP": *"\([0-9.]*\)".*/\1/p')
measure() {
  wrk -t1 -c1 -d10s --latency "http://$IP:8080/" >"$WORK/wrk.txt"
  local rps p50 p99 max
  rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.txt")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/wrk.txt")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/wrk.txt")
  max=$(awk '$1=="Latency" {print $4}' "$WORK/wrk.txt")
  echo "| $1 | $rps | $p50 | $p99 | $max |"
}
echo "wasmctl: $("$WASMCTL_BIN" --version); $(nproc) cores; wrk -t1 -c1 -d10s against one hello pod"
echo "| neighbours on the node | req/s | p50 | p99 | max |"
echo "|---|---:|---:|---:|---:|"
measure "none"
pod hog-limited cpu-hog:v1 200m
measure "1 cpu-hog, limits.cpu 200m"
W delete pod hog-limited >/dev/null
pod hog-a cpu-hog:v1
pod hog-b cpu-hog:v1
measure "2 cpu-hogs, no limit (one per core)"
