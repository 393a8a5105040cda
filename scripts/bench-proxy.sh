#!/usr/bin/env bash
# Service proxy benchmark (issue 5): one `wasmctl up` (node IP 127.251.0.1, ClusterIPs from
# 127.98.0.0/24, pods in 127.78.0.0/16, away from other clusters on this machine), a 1-replica
# `hello` Deployment behind a NodePort Service (port named `http`: per-request HTTP mode),
# then the same wrk run against
#   direct   — the pod (podIP:8080, the agent serving the component in-process),
#   nodeport — the agent's proxy (nodeIP:30090 → in-process to the same pod),
#   haproxy  — Debian's haproxy (HTTP mode, keep-alive both sides) in front of the same pod.
# The three alternate for BENCH_ROUNDS rounds (a shared 2-core machine is noisy); prints one
# JSON line per run and a markdown table of each system's median round, with the ratios.
#   BENCH_WRK_ARGS (-t2 -c32 -d10s), BENCH_ROUNDS (3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools wrk haproxy
wasmctl_build --bin wasmctl
apps_build
HELLO="$APPS/hello.wasm"
WRK_ARGS="${BENCH_WRK_ARGS:--t2 -c32 -d10s}"
ROUNDS="${BENCH_ROUNDS:-3}"
NODE_IP=127.251.0.1
NODE_PORT=30090
HAPROXY_PORT=30091
bench_init

up_start "$WORK/up" --node-ip "$NODE_IP" --pod-cidr 127.78.0.0/16 --dns-listen "$NODE_IP:0" \
  --service-cluster-ip-range 127.98.0.0/24
up_wait
wctl push "$HELLO" hello:v1 >/dev/null
{
  hello_deployment 1 v1
  cat <<EOF
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
    nodePort: $NODE_PORT
EOF
} | wctl apply -f - >/dev/null
POD_IP=
# The Service's endpoint (the pod IP), once the NodePort answers through it.
endpoint_ready() {
  POD_IP=$(wctl get endpoints web -o json 2>/dev/null \
    | python3 -c 'import json,sys; e=json.load(sys.stdin); print(e["subsets"][0]["addresses"][0]["ip"])' 2>/dev/null || true)
  [ -n "$POD_IP" ] && curl -fsS "http://$NODE_IP:$NODE_PORT/"
}
wait_for 120 endpoint_ready || true
[ -n "$POD_IP" ] || { echo "the service never got an endpoint" >&2; exit 1; }

cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 4096
  nbthread 2
defaults
  mode http
  option http-keep-alive
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind $NODE_IP:$HAPROXY_PORT
  default_backend pods
backend pods
  balance roundrobin
  http-reuse always
  server pod1 $POD_IP:8080
EOF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
bg_track $!
wait_for 10 curl -fsS "http://$NODE_IP:$HAPROXY_PORT/" || true

echo "wasmctl: $("$WASMCTL_BIN" --version); $(haproxy -v | head -1); wrk: $(wrk -v 2>&1 | head -1); $(nproc) cores; wrk $WRK_ARGS"
OUT="$WORK/results.jsonl"
: >"$OUT"
run() {
  local system=$1 url=$2 round=$3
  # shellcheck disable=SC2086
  wrk $WRK_ARGS --latency "$url" >"$WORK/$system.wrk"
  wrk_json "$WORK/$system.wrk" bench=proxy system="$system" round:="$round" url="$url" args="$WRK_ARGS" | tee -a "$OUT"
}
for round in $(seq 1 "$ROUNDS"); do
  run direct "http://$POD_IP:8080/" "$round"
  run nodeport "http://$NODE_IP:$NODE_PORT/" "$round"
  run haproxy "http://$NODE_IP:$HAPROXY_PORT/" "$round"
done

python3 - "$OUT" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
systems = []
for r in runs:
    if r["system"] not in systems:
        systems.append(r["system"])
def median(system):
    rs = sorted((r for r in runs if r["system"] == system), key=lambda r: float(r["req_per_s"]))
    return rs[len(rs) // 2], [float(r["req_per_s"]) for r in rs]
base = float(median("direct")[0]["req_per_s"])
print()
print(f"median of {len(runs) // len(systems)} rounds")
print()
print("| path | req/s (median) | p50 | p99 | vs direct | all rounds (req/s) | errors |")
print("|------|------:|----:|----:|----------:|----|--------|")
for s in systems:
    r, all_rps = median(s)
    rps = float(r["req_per_s"])
    errs = sum(int(x["non_2xx"] or 0) for x in runs if x["system"] == s)
    sock = [x["socket_errors"] for x in runs if x["system"] == s and x["socket_errors"]]
    err = ", ".join([f"{errs} non-2xx"] * bool(errs) + sock) or "none"
    print(f'| {s} | {rps:,.0f} | {r["p50"]} | {r["p99"]} | {rps / base:.2f}x | {", ".join(f"{x:,.0f}" for x in all_rps)} | {err} |')
PY
