#!/usr/bin/env bash
# Pod runtime benchmark (issue 3): one `wasmctl up` (API server + node agent in one process)
# in a temp dir, `hello` pushed, then `examples/podbench.rs`: N pods created with bounded
# concurrency, create -> Running / Ready (watch) / first HTTP 200 per pod, RSS per idle pod,
# a GET of every pod; then wrk against one pod; then, in a fresh `wasmctl up`, a bigger
# density run. Before all that, a fresh `wasmctl up` with pods created one at a time (the
# uncontended start latency). Prints the JSON lines and a markdown table.
#   BENCH_PODS (1000), BENCH_PODS_BIG (5000; 0 skips), BENCH_CONCURRENCY (16),
#   BENCH_PODS_SERIAL (100, created at concurrency 1; 0 skips),
#   BENCH_WRK_ARGS (-t2 -c32 -d10s), BENCH_INSTANCE_SLOTS (2000)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools wrk
wasmctl_build --bin wasmctl --example podbench
apps_build
HELLO="$APPS/hello.wasm"
PODBENCH="$CARGO_TARGET_DIR/debug/examples/podbench"
N="${BENCH_PODS:-1000}"; BIG="${BENCH_PODS_BIG:-5000}"; CONC="${BENCH_CONCURRENCY:-16}"
SLOTS="${BENCH_INSTANCE_SLOTS:-2000}"; WRK_ARGS="${BENCH_WRK_ARGS:--t2 -c32 -d10s}"
ulimit -n "$(ulimit -Hn)"   # a listener per pod, plus the poller's connections
bench_init

# start_up NAME MAX_PODS: a fresh `wasmctl up` in $WORK/NAME (pods in 127.77.0.0/16, away
# from the default CIDR other clusters on this machine use), hello pushed.
start_up() {
  up_start "$WORK/$1" --max-pods "$2" --instance-slots "$SLOTS" --pod-cidr 127.77.0.0/16
  up_wait
  wctl push "$HELLO" hello:v1 >/dev/null
}

echo "wasmctl: $("$WASMCTL_BIN" --version); wrk: $(wrk -v 2>&1 | head -1); $(nproc) cores"
OUT="$WORK/results.jsonl"
: >"$OUT"

SERIAL="${BENCH_PODS_SERIAL:-100}"
if [ "$SERIAL" -gt 0 ]; then
  start_up run0 $((SERIAL + 10))
  "$PODBENCH" "$UP_KUBECONFIG" "$SERIAL" 1 "$UP_PID" | tee -a "$OUT"
  up_stop
fi

start_up run1 $((N + 10))
"$PODBENCH" "$UP_KUBECONFIG" "$N" "$CONC" "$UP_PID" | tee -a "$OUT"
IP=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    d=json.loads(l)
    if d["bench"]=="target": print(d["ip"])' "$OUT" | tail -1)
if [ -n "$IP" ]; then
  # shellcheck disable=SC2086
  wrk $WRK_ARGS --latency "http://$IP:8080/" >"$WORK/wrk.txt"
  cat "$WORK/wrk.txt"
  wrk_json "$WORK/wrk.txt" bench=wrk system=wasmctl url="http://$IP:8080/" idle_pods:="$N" args="$WRK_ARGS" >>"$OUT"
  tail -1 "$OUT"
fi
if command -v wasmtime >/dev/null; then
  wasmtime serve -Scli --addr 127.0.0.1:18080 "$HELLO" >"$WORK/wasmtime.log" 2>&1 &
  WT_PID=$!
  bg_track "$WT_PID"
  wait_for 10 curl -sf http://127.0.0.1:18080/ || true
  # shellcheck disable=SC2086
  wrk $WRK_ARGS --latency http://127.0.0.1:18080/ | tee "$WORK/wrk-wasmtime.txt"
  bg_stop "$WT_PID"
  wrk_json "$WORK/wrk-wasmtime.txt" bench=wrk "system=wasmtime serve" url=http://127.0.0.1:18080/ idle_pods:=0 args="$WRK_ARGS" >>"$OUT"
else
  echo "wasmtime not installed: no 'wasmtime serve' baseline (cargo install wasmtime-cli --version 48.0.2 --locked)"
fi
up_stop

if [ "$BIG" -gt 0 ]; then
  start_up run2 $((BIG + 10))
  "$PODBENCH" "$UP_KUBECONFIG" "$BIG" "$CONC" "$UP_PID" | tee -a "$OUT"
  up_stop
fi

echo
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| pods | creates in flight | measurement | p50 | p99 | max | samples |")
print("|-----:|------------------:|-------------|----:|----:|----:|--------:|")
for r in rows:
    if r["bench"] != "pod_start":
        continue
    for key, label in [("create_post_ms", "POST answered"),
                       ("create_to_running_ms", "create -> Running (watch)"),
                       ("create_to_ready_ms", "create -> Ready (watch)"),
                       ("create_to_first_200_ms", "create -> first HTTP 200")]:
        s = r[key]
        print(f"| {r['pods']} | {r['concurrency']} | {label} | {s['p50']} ms | {s['p99']} ms | {s['max']} ms | {s['n']} |")
print()
print("| pods | RSS before | RSS with all pods idle | RSS per idle pod | GET / of every pod: ok / failed |")
print("|-----:|-----------:|-----------------------:|-----------------:|------------------:|")
for r in rows:
    if r["bench"] == "density":
        print(f"| {r['pods']} | {r['rss_before_kib']} KiB | {r['rss_after_kib']} KiB | "
              f"{r['rss_per_pod_kib']} KiB | {r['http_ok']} / {r['http_failed']} |")
print()
print("| system | wrk | pods on the node | req/s | p50 | p99 | non-2xx | socket errors |")
print("|--------|-----|--------------------:|------:|----:|----:|--------:|---------------|")
for r in rows:
    if r["bench"] == "wrk":
        print(f"| {r['system']} | {r['args']} | {r['idle_pods']} | {r['req_per_s']} | {r['p50']} | "
              f"{r['p99']} | {r['non_2xx'] or 0} | {r['socket_errors'] or 'none'} |")
for r in rows:
    if r["bench"] == "pod_start":
        print(f"\n{r['pods']} pods: {r['create_errors']} create errors, creates done in "
              f"{r['create_wall_s']:.3f} s, all Ready after {r['all_ready_wall_s']:.3f} s, "
              f"{r['watch_reconnects']} watch reconnects")
    if r["bench"] == "not_ready":
        print("not ready:", json.dumps(r))
PY
