#!/usr/bin/env bash
# Every hostile guest at once on one node, next to a healthy pod: the healthy `hello` pod's
# p50/p99 (wrk -t1 -c1, 10 s) and the agent's RSS, before and while `hostile` pods (no
# egress, and egress "*") hammer the node with everything the sandbox must contain — socket
# hoarding past the per-pod budget, empty-line floods into the log ring, host name lookups,
# connects to the host's own services, traps, and CPU spinning. Loops are bounded (10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools wrk curl
wasmctl_build --bin wasmctl
apps_build
bench_init
up_start "$WORK" --pod-cidr 127.77.0.0/16
up_wait
wctl push "$APPS/hello.wasm" hello:v1 >/dev/null
wctl push "$APPS/hostile.wasm" hostile:v1 >/dev/null
rss() { awk '/^VmRSS/ {print $2 " " $3}' "/proc/$UP_PID/status"; }
measure() {
  wrk -t1 -c1 -d10s --latency "http://$IP:8080/" >"$WORK/wrk.txt"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.txt")
  p50=$(awk '$1=="50%" {print $2}' "$WORK/wrk.txt")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/wrk.txt")
  echo "| $1 | $rps | $p50 | $p99 | $(rss) |"
}
pod_start hello hello:v1
pod_start hostile hostile:v1
pod_start hostile-all hostile:v1 '' '*'
IP=$(pod_ip hello)
H1=$(pod_ip hostile)
H2=$(pod_ip hostile-all)
HOST_PORT=$(awk -F'[:/]' '/server:/ {print $NF}' "$UP_KUBECONFIG")
echo "wasmctl: $("$WASMCTL_BIN" --version); $(nproc) cores; wrk -t1 -c1 -d10s against one hello pod"
echo "| neighbours on the node | req/s | p50 | p99 | agent RSS after |"
echo "|---|---:|---:|---:|---:|"
measure "none (RSS before: $(rss))"
# attack URL...: requests back to back for 10 s, 4 at a time.
attack() {
  local end=$((SECONDS + 10)) url
  while [ "$SECONDS" -lt "$end" ]; do
    for url in "$@"; do curl -s -o /dev/null --max-time 5 "$url" & done
    wait
  done
}
attack "http://$H1:8080/sockets?n=1500" "http://$H1:8080/newlines?n=200000" \
  "http://$H1:8080/resolve?name=exfil.example.com" "http://$H1:8080/trap" &
A1=$!
attack "http://$H2:8080/connect?addr=127.0.0.1:$HOST_PORT" "http://$H2:8080/http?url=http://2130706433:$HOST_PORT/" \
  "http://$H2:8080/spin?ms=200" "http://$H2:8080/sockets?n=1500" &
A2=$!
measure "2 hostile pods: sockets, newline floods, lookups, host connects, traps, spinning"
wait "$A1" "$A2"
echo "agent RSS 5 s after the attacks: $(sleep 5; rss)"
for what in "sockets?n=1500" "connect?addr=127.0.0.1:$HOST_PORT" "resolve?name=exfil.example.com"; do
  echo "hostile /$what -> $(curl -s --max-time 10 "http://$H1:8080/$what")"
done
