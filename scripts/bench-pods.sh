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
. scripts/env.sh
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
cargo build --locked --bin wasmctl --example podbench
(cd wasi-apps && cargo build --locked --release --target wasm32-wasip2)
HELLO="$PWD/wasi-apps/target/wasm32-wasip2/release/hello.wasm"
PODBENCH="$CARGO_TARGET_DIR/debug/examples/podbench"
N="${BENCH_PODS:-1000}"; BIG="${BENCH_PODS_BIG:-5000}"; CONC="${BENCH_CONCURRENCY:-16}"
SLOTS="${BENCH_INSTANCE_SLOTS:-2000}"; WRK_ARGS="${BENCH_WRK_ARGS:--t2 -c32 -d10s}"
ulimit -n "$(ulimit -Hn)"   # a listener per pod, plus the poller's connections
WORK=$(mktemp -d)
UP_PID=
stop_up() {
  [ -n "$UP_PID" ] || return 0
  kill -INT "$UP_PID" 2>/dev/null || true
  for _ in $(seq 1 600); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
  UP_PID=
}
WT_PID=
cleanup() { [ -z "$WT_PID" ] || kill "$WT_PID" 2>/dev/null || true; stop_up; if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

# start_up NAME MAX_PODS: a fresh `wasmctl up` in $WORK/NAME (pods in 127.77.0.0/16, away
# from the default CIDR other clusters on this machine use), hello pushed.
start_up() {
  local dir="$WORK/$1"
  mkdir -p "$dir"
  "$WASMCTL_BIN" up --data-dir "$dir" --listen 127.0.0.1:0 --name node-1 --kubelet-port 0 \
    --max-pods "$2" --instance-slots "$SLOTS" --pod-cidr 127.77.0.0/16 \
    >"$dir/up.out" 2>"$dir/up.log" &
  UP_PID=$!
  for _ in $(seq 1 600); do
    grep -q "API server listening on" "$dir/up.out" 2>/dev/null && break
    kill -0 "$UP_PID" 2>/dev/null || { cat "$dir/up.log" >&2; exit 1; }
    sleep 0.1
  done
  KUBECONFIG_PATH="$dir/kubeconfig.yaml"
  "$WASMCTL_BIN" --kubeconfig "$KUBECONFIG_PATH" push "$HELLO" hello:v1 >/dev/null
}

# wrk_json SYSTEM URL IDLE_PODS WRK_OUTPUT: one JSON line from wrk's --latency report.
wrk_json() {
  python3 - "$@" "$WRK_ARGS" <<'PY'
import json, re, sys
system, url, pods, path, args = sys.argv[1:6]
t = open(path).read()
def grab(p):
    m = re.search(p, t, re.M)
    return m.group(1) if m else None
print(json.dumps({"bench": "wrk", "system": system, "url": url, "idle_pods": int(pods),
    "args": args, "req_per_s": grab(r"^Requests/sec:\s+(\S+)"), "p50": grab(r"^\s+50%\s+(\S+)"),
    "p99": grab(r"^\s+99%\s+(\S+)"), "requests": grab(r"^\s+(\d+) requests in"),
    "non_2xx": grab(r"Non-2xx or 3xx responses: (\d+)"), "socket_errors": grab(r"Socket errors: (.*)$")}))
PY
}

echo "wasmctl: $("$WASMCTL_BIN" --version); wrk: $(wrk -v 2>&1 | head -1); $(nproc) cores"
OUT="$WORK/results.jsonl"
: >"$OUT"

SERIAL="${BENCH_PODS_SERIAL:-100}"
if [ "$SERIAL" -gt 0 ]; then
  start_up run0 $((SERIAL + 10))
  "$PODBENCH" "$KUBECONFIG_PATH" "$SERIAL" 1 "$UP_PID" | tee -a "$OUT"
  stop_up
fi

start_up run1 $((N + 10))
"$PODBENCH" "$KUBECONFIG_PATH" "$N" "$CONC" "$UP_PID" | tee -a "$OUT"
IP=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    d=json.loads(l)
    if d["bench"]=="target": print(d["ip"])' "$OUT" | tail -1)
if [ -n "$IP" ]; then
  # shellcheck disable=SC2086
  wrk $WRK_ARGS --latency "http://$IP:8080/" >"$WORK/wrk.txt"
  cat "$WORK/wrk.txt"
  wrk_json wasmctl "http://$IP:8080/" "$N" "$WORK/wrk.txt" >>"$OUT"
  tail -1 "$OUT"
fi
if command -v wasmtime >/dev/null; then
  wasmtime serve -Scli --addr 127.0.0.1:18080 "$HELLO" >"$WORK/wasmtime.log" 2>&1 &
  WT_PID=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/ >/dev/null && break; sleep 0.1; done
  # shellcheck disable=SC2086
  wrk $WRK_ARGS --latency http://127.0.0.1:18080/ | tee "$WORK/wrk-wasmtime.txt"
  kill "$WT_PID"; wait "$WT_PID" 2>/dev/null || true; WT_PID=
  wrk_json "wasmtime serve" http://127.0.0.1:18080/ 0 "$WORK/wrk-wasmtime.txt" >>"$OUT"
else
  echo "wasmtime not installed: no 'wasmtime serve' baseline (cargo install wasmtime-cli --version 48.0.2 --locked)"
fi
stop_up

if [ "$BIG" -gt 0 ]; then
  start_up run2 $((BIG + 10))
  "$PODBENCH" "$KUBECONFIG_PATH" "$BIG" "$CONC" "$UP_PID" | tee -a "$OUT"
  stop_up
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
