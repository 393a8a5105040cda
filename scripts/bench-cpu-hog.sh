#!/usr/bin/env bash
# Isolation benchmark: the latency of a healthy `hello` pod while CPU hogs run on the same node.
# One wrk connection, requests back to back (latency, not saturation), 10 s per case:
# baseline; one cpu-hog limited to 200m; two unlimited cpu-hogs (one per core); a `hostile`
# pod limited to 500m with 20 requests spinning at once (issue 11 item 12), and the same pod
# without a limit. The agent runs with its default --guest-cpu-slots (cores - 1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools wrk
wasmctl_build --bin wasmctl
apps_build
bench_init
up_start "$WORK" --pod-cidr 127.76.0.0/16
up_wait
wctl push "$APPS/hello.wasm" hello:v1 >/dev/null
wctl push "$APPS/cpu-hog.wasm" cpu-hog:v1 >/dev/null
wctl push "$APPS/hostile.wasm" hostile:v1 >/dev/null
pod_start hello hello:v1
IP=$(pod_ip hello)
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
pod_start hog-limited cpu-hog:v1 200m
measure "1 cpu-hog, limits.cpu 200m"
wctl delete pod hog-limited >/dev/null
pod_start hog-a cpu-hog:v1
pod_start hog-b cpu-hog:v1
measure "2 cpu-hogs, no limit (one per core)"
wctl delete pod hog-a hog-b >/dev/null
# N connections of back-to-back 200 ms spinning requests against POD, in the background: a
# second wrk (one thread, epoll), so the load generator itself costs next to no CPU.
spinners() { # POD N
  local ip
  ip=$(pod_ip "$1")
  wrk -t1 -c"$2" -d60s --timeout 30s "http://$ip:8080/spin?ms=200" >"$WORK/spin.txt" 2>&1 &
  bg_track $!
}
stop_spinners() {
  local pid
  for pid in "${BG_PIDS[@]}"; do bg_stop "$pid"; done
}
pod_start spin-limited hostile:v1 500m
spinners spin-limited 20
measure "hostile pod, limits.cpu 500m, 20 requests spinning"
stop_spinners
wctl delete pod spin-limited >/dev/null
pod_start spin-unlimited hostile:v1
spinners spin-unlimited 20
measure "hostile pod, no limit, 20 requests spinning"
stop_spinners
