#!/usr/bin/env bash
# Rollout benchmark (issue 4): one `wasmctl up` (API server, controllers and one node agent) in
# a temp dir; a Deployment of BENCH_REPLICAS (100) `hello` replicas with the default strategy
# (RollingUpdate, maxSurge 25%, maxUnavailable 25%) and a readiness probe; then the time from
# `apply` of v2 to `rollout status` reporting success (every replica replaced and available),
# BENCH_ROUNDS (3) times alternating v1/v2, plus the time to scale 0 -> N at the start.
# Prints one JSON line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
wasmctl_build --bin wasmctl
apps_build
HELLO="$APPS/hello.wasm"
N="${BENCH_REPLICAS:-100}"; ROUNDS="${BENCH_ROUNDS:-3}"
ulimit -n "$(ulimit -Hn)"
bench_init

up_start "$WORK" --max-pods $((N * 2 + 10)) --pod-cidr 127.78.0.0/16
up_wait
wctl push "$HELLO" hello:v1 >/dev/null
wctl push "$HELLO" hello:v2 >/dev/null

now() { date +%s.%N; }
measure() { # NAME REPLICAS VERSION
  local t0 t1
  t0=$(now)
  hello_deployment "$2" "$3" | wctl apply -f - >/dev/null
  wctl rollout status deployment/web --timeout 600s >/dev/null
  t1=$(now)
  python3 -c "import json,sys; print(json.dumps({'bench': sys.argv[1], 'replicas': int(sys.argv[2]), 'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 3)}))" "$1" "$2" "$t0" "$t1"
}

measure "create 0 -> N (v1)" "$N" v1
v=v2
for _ in $(seq 1 "$ROUNDS"); do
  measure "rolling update (25%/25%) to $v" "$N" "$v"
  [ "$v" = v2 ] && v=v1 || v=v2
done
pods=$(wctl get pods -o json | python3 -c "import json,sys; print(len(json.load(sys.stdin)['items']))")
echo "{\"pods_after\": $pods}"
