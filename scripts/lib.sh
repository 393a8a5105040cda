# shellcheck shell=bash
# Sourced by the bench scripts (and up.sh) after `cd` to the clone's root: what each of them
# needs around its measurement — building wasmctl and the guests from a fresh clone, installing
# missing tools, one throwaway `wasmctl up` / `wasmctl server` (start, wait until it serves, stop
# at exit), waiting for a condition, and turning wrk's report into a JSON line.
# Sourcing it sources env.sh (CARGO_TARGET_DIR, WASMCTL_BIN) and defines functions and the
# UP_* / BG_PIDS state below; it starts nothing, installs no trap and changes no shell option.

# shellcheck source=scripts/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# The wasmctl process up_start/server_start started (empty: none), its stdout (the start lines
# up_wait reads) and stderr (the log), and the kubeconfig it writes into its data dir.
UP_PID=""
UP_OUT=""
UP_LOG=""
UP_KUBECONFIG=""
# Helper processes (haproxy, dnsmasq, etcd, ...) bench_cleanup stops at exit.
BG_PIDS=()

# need_tools CMD[=PACKAGE]...: apt-get install the Debian PACKAGE (default: CMD) of each CMD
# that is neither on PATH nor in /usr/sbin.
need_tools() {
  local want=() t sudo=""
  for t in "$@"; do
    command -v "${t%%=*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${t%%=*}" ] || want+=("${t#*=}")
  done
  [ ${#want[@]} -gt 0 ] || return 0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${want[@]}" >/dev/null
}

# wasmctl_build CARGO_ARGS...: what building needs (setup-deps.sh), then
# `cargo build --locked CARGO_ARGS` into the shared $CARGO_TARGET_DIR (e.g. --bin wasmctl,
# --example podbench; the examples land in $CARGO_TARGET_DIR/debug/examples/).
wasmctl_build() {
  "$(dirname "${BASH_SOURCE[0]}")/setup-deps.sh"
  cargo build --locked "$@"
}

# apps_build: the guest components (wasi-apps/, wasm32-wasip2, release) into the clone's
# wasi-apps/target, like up.sh always did and the integration tests do (not the shared
# CARGO_TARGET_DIR: cargo re-links release/NAME.wasm only when it rebuilds); sets APPS to the
# folder of the NAME.wasm files.
apps_build() {
  local apps
  apps=$(cd "$(dirname "${BASH_SOURCE[0]}")/../wasi-apps" && pwd)
  (cd "$apps" && CARGO_TARGET_DIR="$apps/target" cargo build --locked --release --target wasm32-wasip2)
  # shellcheck disable=SC2034 # for the caller
  APPS="$apps/target/wasm32-wasip2/release"
}

# bench_init: WORK, a fresh temp dir, and an EXIT trap (bench_cleanup) that stops what the
# script started and removes WORK.
bench_init() {
  WORK=$(mktemp -d)
  trap bench_cleanup EXIT
}

# bench_cleanup: stop the helpers (bg_track), then the wasmctl process (up_stop); remove WORK,
# or keep it and say so when BENCH_KEEP is set.
bench_cleanup() {
  local pid
  for pid in "${BG_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  BG_PIDS=()
  up_stop
  [ -n "${WORK:-}" ] || return 0
  if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}

# bg_track PID: stop this helper process at exit. bg_stop PID: stop it now (SIGTERM, wait).
bg_track() { BG_PIDS+=("$1"); }
bg_stop() {
  local pid rest=()
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for pid in "${BG_PIDS[@]}"; do [ "$pid" = "$1" ] || rest+=("$pid"); done
  BG_PIDS=("${rest[@]}")
}

# up_start DIR [ARGS...]: `wasmctl up` in the background, on loopback only (API server on an
# ephemeral port, agent endpoint too), one node `node-1`, state in DIR, stdout in DIR/up.out and
# stderr in DIR/up.log; ARGS go to `wasmctl up` (--pod-cidr, --max-pods, ...).
up_start() {
  local dir=$1
  shift
  _wasmctl_start "$dir" up --name node-1 --kubelet-port 0 "$@"
}

# server_start DIR [ARGS...]: the same for `wasmctl server` alone (no node agent):
# DIR/server.out, DIR/server.log.
server_start() {
  local dir=$1
  shift
  _wasmctl_start "$dir" server "$@"
}

# _wasmctl_start DIR SUBCOMMAND [ARGS...]: one wasmctl process at a time (UP_PID).
_wasmctl_start() {
  local dir=$1 sub=$2
  shift 2
  [ -z "$UP_PID" ] || { echo "lib.sh: a wasmctl process ($UP_PID) is already running" >&2; exit 1; }
  mkdir -p "$dir"
  UP_OUT="$dir/$sub.out"
  UP_LOG="$dir/$sub.log"
  UP_KUBECONFIG="$dir/kubeconfig.yaml"
  "$WASMCTL_BIN" "$sub" --data-dir "$dir" --listen 127.0.0.1:0 "$@" >"$UP_OUT" 2>"$UP_LOG" &
  UP_PID=$!
}

# up_wait [LINE]: wait (60 s at most) until the process started above printed LINE (default
# "API server listening on": the API answers and the kubeconfig is written; `wasmctl up` prints
# it once its node agent runs too); exits the script, showing the log, if it died or timed out.
# shellcheck disable=SC2120 # LINE is optional
up_wait() {
  local line=${1:-API server listening on} deadline=$((SECONDS + 60))
  until grep -q "$line" "$UP_OUT" 2>/dev/null; do
    if ! kill -0 "$UP_PID" 2>/dev/null; then
      cat "$UP_LOG" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "wasmctl did not print \"$line\" within 60 s; its log ($UP_LOG):" >&2
      tail -n 50 "$UP_LOG" >&2
      exit 1
    fi
    sleep 0.1
  done
}

# up_stop: stop the wasmctl process, if any: SIGTERM (wasmctl handles it as Ctrl-C: pods stop
# cleanly, then the server; a script's background job starts with SIGINT ignored), up to 60 s,
# then SIGKILL; reap it.
up_stop() {
  [ -n "$UP_PID" ] || return 0
  local deadline=$((SECONDS + 60))
  kill -TERM "$UP_PID" 2>/dev/null || true
  while kill -0 "$UP_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  kill -KILL "$UP_PID" 2>/dev/null || true
  wait "$UP_PID" 2>/dev/null || true
  UP_PID=""
}

# wctl ARGS...: the wasmctl CLI against the cluster up_start/server_start started (else
# $KUBECONFIG's).
wctl() { "$WASMCTL_BIN" ${UP_KUBECONFIG:+--kubeconfig "$UP_KUBECONFIG"} "$@"; }

# pod_ip NAME: the pod's IP (empty until it has one).
pod_ip() { wctl get pod "$1" -o json | sed -n 's/.*"podIP": *"\([0-9.]*\)".*/\1/p'; }

# pod_running NAME: the pod's phase is Running.
pod_running() { case "$(wctl get pod "$1" -o json)" in *'"phase": "Running"'*) return 0 ;; esac; return 1; }

# pod_start NAME IMAGE [CPU_LIMIT] [EGRESS]: a pod on node-1 serving containerPort 8080,
# with `limits.cpu` and the `wasmctl.dev/egress` annotation when given; waits until it runs
# (exits the script if it does not within 120 s).
pod_start() {
  local limits="" ann=""
  [ -z "${3:-}" ] || limits="resources: {limits: {cpu: $3}}"
  [ -z "${4:-}" ] || ann="annotations: {wasmctl.dev/egress: \"$4\"}"
  wctl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $1
  $ann
spec:
  nodeName: node-1
  containers:
  - name: c
    image: $2
    ports: [{containerPort: 8080}]
    $limits
YAML
  wait_for 120 pod_running "$1" || { echo "pod $1 did not start" >&2; exit 1; }
}

# wait_for SECONDS CMD [ARGS...]: run CMD (its output discarded; a shell function may set
# variables) every 0.1 s until it succeeds: 0, or 1 once SECONDS have passed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# hello_deployment REPLICAS TAG: the manifest of Deployment `web`, REPLICAS pods of
# `hello:TAG` (containerPort 8080 named http, readiness probe GET / every second).
hello_deployment() {
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

# wrk_json WRK_OUTPUT KEY=VALUE... [KEY:=JSON]...: one JSON line, the given keys in order
# (KEY:=JSON for numbers), then from wrk's --latency report req_per_s, p50, p99, requests,
# non_2xx and socket_errors (strings as wrk prints them; null where absent).
wrk_json() {
  python3 - "$@" <<'PY'
import json, re, sys
path, pairs = sys.argv[1], sys.argv[2:]
t = open(path).read()
def grab(p):
    m = re.search(p, t, re.M)
    return m.group(1) if m else None
out = {}
for kv in pairs:
    k, v = kv.split("=", 1)
    if k.endswith(":"):
        out[k[:-1]] = json.loads(v)
    else:
        out[k] = v
out.update({"req_per_s": grab(r"^Requests/sec:\s+(\S+)"), "p50": grab(r"^\s+50%\s+(\S+)"),
    "p99": grab(r"^\s+99%\s+(\S+)"), "requests": grab(r"^\s+(\d+) requests in"),
    "non_2xx": grab(r"Non-2xx or 3xx responses: (\d+)"), "socket_errors": grab(r"Socket errors: (.*)$")})
print(json.dumps(out))
PY
}
