#!/usr/bin/env bash
# Rollout benchmark (issue 4): one `wasmctl up` (API server, controllers and one node agent) in
# a temp dir; a Deployment of BENCH_REPLICAS (100) `hello` replicas with the default strategy
# (RollingUpdate, maxSurge 25%, maxUnavailable 25%) and a readiness probe; then the time from
# `apply` of v2 to `rollout status` reporting success (every replica replaced and available),
# BENCH_ROUNDS (3) times alternating v1/v2, plus the time to scale 0 -> N at the start.
# Prints one JSON line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --locked --bin wasmctl
(cd wasi-apps && cargo build --locked --release --target wasm32-wasip2)
HELLO="$PWD/wasi-apps/target/wasm32-wasip2/release/hello.wasm"
N="${BENCH_REPLICAS:-100}"; ROUNDS="${BENCH_ROUNDS:-3}"
ulimit -n "$(ulimit -Hn)"
WORK=$(mktemp -d)
UP_PID=
cleanup() {
  if [ -n "$UP_PID" ]; then
    kill -INT "$UP_PID" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$UP_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$WASMCTL_BIN" up --data-dir "$WORK" --listen 127.0.0.1:0 --name node-1 --kubelet-port 0 \
  --max-pods $((N * 2 + 10)) --pod-cidr 127.78.0.0/16 >"$WORK/up.out" 2>"$WORK/up.log" &
UP_PID=$!
for _ in $(seq 1 600); do
  grep -q "API server listening on" "$WORK/up.out" 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { cat "$WORK/up.log" >&2; exit 1; }
  sleep 0.1
done
W=("$WASMCTL_BIN" --kubeconfig "$WORK/kubeconfig.yaml")
"${W[@]}" push "$HELLO" hello:v1 >/dev/null
"${W[@]}" push "$HELLO" hello:v2 >/dev/null

manifest() {
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: $1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: hello
        image: hello:$2
        ports:
        - name: http
          containerPort: 8080
        readinessProbe:
          httpGet:
            path: /
            port: http
          periodSeconds: 1
YAML
}

now() { date +%s.%N; }
measure() { # NAME REPLICAS VERSION
  local t0 t1
  t0=$(now)
  manifest "$2" "$3" | "${W[@]}" apply -f - >/dev/null
  "${W[@]}" rollout status deployment/web --timeout 600s >/dev/null
  t1=$(now)
  python3 -c "import json,sys; print(json.dumps({'bench': sys.argv[1], 'replicas': int(sys.argv[2]), 'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 3)}))" "$1" "$2" "$t0" "$t1"
}

measure "create 0 -> N (v1)" "$N" v1
v=v2
for _ in $(seq 1 "$ROUNDS"); do
  measure "rolling update (25%/25%) to $v" "$N" "$v"
  [ "$v" = v2 ] && v=v1 || v=v2
done
pods=$("${W[@]}" get pods -o json | python3 -c "import json,sys; print(len(json.load(sys.stdin)['items']))")
echo "{\"pods_after\": $pods}"
