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

# ---------------------------------------------------------------- HA clusters (issue 12)
# bench-ha.sh and bench-catchup.sh: a 3-member etcd cluster and a 3-member wasmctl HA control
# plane as processes, each member on its own ports (etcd) or loopback IP (wasmctl), fsync on.

# free_ports COUNT [IP...]: COUNT distinct TCP ports, each free right now on every IP (default
# 127.0.0.1), one a line.
free_ports() {
  local count=$1
  shift
  python3 - "$count" "${@:-127.0.0.1}" <<'PY'
import socket, sys
count, ips = int(sys.argv[1]), sys.argv[2:]
held, ports = [], []
while len(ports) < count:
    s = socket.socket()
    s.bind((ips[0], 0))
    port = s.getsockname()[1]
    held.append(s)
    ok = True
    for ip in ips[1:]:
        t = socket.socket()
        try:
            t.bind((ip, port))
        except OSError:
            ok = False
        t.close()
    if ok:
        ports.append(port)
print("\n".join(map(str, ports)))
PY
}

# _bg_forget PID: no longer stop PID at exit (it was stopped and reaped already).
_bg_forget() {
  local pid rest=()
  for pid in "${BG_PIDS[@]}"; do [ "$pid" = "$1" ] || rest+=("$pid"); done
  BG_PIDS=("${rest[@]}")
}

# _stop_reap SECONDS PID...: SIGTERM each PID, up to SECONDS for all to exit, then SIGKILL
# (also ends a SIGSTOPped one); reap them and forget them (bg_track).
_stop_reap() {
  local deadline=$((SECONDS + $1)) pid alive
  shift
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; kill -CONT "$pid" 2>/dev/null || true; done
  while :; do
    alive=0
    for pid in "$@"; do ! kill -0 "$pid" 2>/dev/null || alive=1; done
    if [ "$alive" = 0 ] || [ "$SECONDS" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  for pid in "$@"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    _bg_forget "$pid"
  done
}

# The etcd cluster etcd_cluster_start formed: member i (1..N) is named ei, serves clients at
# ETCD_URLS[i] and peers at ETCD_PEER_URLS[i], keeps its data in ETCD_BASE/ei and its log in
# ETCD_BASE/ei.log (appended across restarts); ETCD_PIDS[i] is its process; ETCD_CLUSTER is
# the --initial-cluster list.
ETCD_BASE=""
ETCD_CLUSTER=""
ETCD_URLS=()
ETCD_PEER_URLS=()
ETCD_PIDS=()

# etcd_cluster_start DIR N [ETCD_ARGS...]: an N-member etcd cluster (Debian's etcd 3.4, its
# defaults: fsync on, heartbeat 100 ms, election timeout 1000 ms) on 127.0.0.1, fresh client
# and peer ports; waits (60 s) until every member answers /health (it has a leader).
# ETCD_ARGS go to every member.
etcd_cluster_start() {
  local dir=$1 n=$2 i
  shift 2
  local -a ports
  mapfile -t ports < <(free_ports $((2 * n)))
  ETCD_BASE=$dir
  ETCD_CLUSTER=""
  for ((i = 1; i <= n; i++)); do
    ETCD_URLS[i]="http://127.0.0.1:${ports[2 * i - 2]}"
    ETCD_PEER_URLS[i]="http://127.0.0.1:${ports[2 * i - 1]}"
    ETCD_CLUSTER+="${ETCD_CLUSTER:+,}e$i=${ETCD_PEER_URLS[i]}"
  done
  mkdir -p "$dir"
  for ((i = 1; i <= n; i++)); do
    etcd_member_start "$i" --initial-cluster-state new --initial-cluster-token "bench-$$" "$@"
  done
  for ((i = 1; i <= n; i++)); do
    wait_for 60 curl -sf "${ETCD_URLS[i]}/health" || {
      echo "etcd member e$i (${ETCD_URLS[i]}) is not healthy within 60 s; its log:" >&2
      tail -n 30 "$dir/e$i.log" >&2
      exit 1
    }
  done
}

# etcd_member_start I [ETCD_ARGS...]: start etcd member I (its name, data dir, URLs and
# --initial-cluster ETCD_CLUSTER; these initial-* flags are ignored once its data dir exists)
# in the background.
etcd_member_start() {
  local i=$1
  shift
  etcd --name "e$i" --data-dir "$ETCD_BASE/e$i" \
    --listen-client-urls "${ETCD_URLS[i]}" --advertise-client-urls "${ETCD_URLS[i]}" \
    --listen-peer-urls "${ETCD_PEER_URLS[i]}" --initial-advertise-peer-urls "${ETCD_PEER_URLS[i]}" \
    --initial-cluster "$ETCD_CLUSTER" --log-level error "$@" >>"$ETCD_BASE/e$i.log" 2>&1 &
  ETCD_PIDS[i]=$!
  bg_track $!
}

# etcd_member_stop I: stop etcd member I (SIGTERM, 30 s, then SIGKILL).
etcd_member_stop() {
  local pid=${ETCD_PIDS[$1]:-}
  [ -n "$pid" ] || return 0
  _stop_reap 30 "$pid"
  ETCD_PIDS[$1]=""
}

# etcd_leader: the number i of the etcd member that leads (its /v3/maintenance/status names
# itself as leader); fails if none does.
etcd_leader() {
  python3 - "${ETCD_URLS[@]}" <<'PY'
import json, sys, urllib.request
for i, url in enumerate(sys.argv[1:], 1):
    try:
        req = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}", method="POST")
        s = json.load(urllib.request.urlopen(req, timeout=2))
    except Exception:
        continue
    if s.get("leader") and s.get("leader") == s.get("header", {}).get("member_id"):
        print(i)
        sys.exit(0)
sys.exit(1)
PY
}

# etcd_cluster_stop: stop every running etcd member at once (SIGTERM, 30 s, then SIGKILL).
etcd_cluster_stop() {
  local i pids=()
  for i in "${!ETCD_PIDS[@]}"; do [ -z "${ETCD_PIDS[i]}" ] || pids+=("${ETCD_PIDS[i]}"); done
  [ ${#pids[@]} -eq 0 ] || _stop_reap 30 "${pids[@]}"
  ETCD_PIDS=()
}

# The wasmctl HA cluster ha_cluster_start formed: member i (1..N) listens on HA_ADDRS[i]
# (127.0.12.i:PORT, one port for all), keeps its state in HA_DIRS[i] (its own kubeconfig:
# HA_DIRS[i]/kubeconfig.yaml, naming itself) and its stdout / stderr in HA_BASE/si.out and
# HA_BASE/si.log (appended across restarts, outside the data dir); HA_PIDS[i] is its process.
# HA_ARGS: extra `wasmctl server` arguments for every member (e.g. --raft-election-timeout),
# set before ha_cluster_start.
HA_BASE=""
HA_ADDRS=()
HA_DIRS=()
HA_PIDS=()
HA_ARGS=()

# ha_init: bench_init, and at exit first ha_cluster_stop and etcd_cluster_stop (members stop
# together, with a deadline), then bench_cleanup.
ha_init() {
  bench_init
  trap 'ha_cluster_stop; etcd_cluster_stop; bench_cleanup' EXIT
}

# ha_member_start I [ARGS...]: start member I (`wasmctl server --data-dir HA_DIRS[I] --listen
# HA_ADDRS[I] HA_ARGS... ARGS...`) in the background; a member that already has its data dir
# needs no other arguments (--cluster-init, --join are ignored then).
ha_member_start() {
  local i=$1
  shift
  [ -z "${HA_PIDS[i]:-}" ] || { echo "lib.sh: HA member $i (${HA_PIDS[i]}) is already running" >&2; exit 1; }
  "$WASMCTL_BIN" server --data-dir "${HA_DIRS[i]}" --listen "${HA_ADDRS[i]}" "${HA_ARGS[@]}" "$@" \
    >>"$HA_BASE/s$i.out" 2>>"$HA_BASE/s$i.log" &
  HA_PIDS[i]=$!
  bg_track $!
}

# ha_member_stop I [SIGNAL]: stop member I: SIGNAL (default TERM: a clean shutdown; KILL: a
# crash), up to 60 s, then SIGKILL; reap it.
ha_member_stop() {
  local i=$1 pid=${HA_PIDS[$1]:-}
  [ -n "$pid" ] || return 0
  kill "-${2:-TERM}" "$pid" 2>/dev/null || true
  _stop_reap 60 "$pid"
  HA_PIDS[i]=""
}

# ha_cluster_stop: stop every running member at once (SIGTERM, 30 s, then SIGKILL).
ha_cluster_stop() {
  local i pids=()
  for i in "${!HA_PIDS[@]}"; do [ -z "${HA_PIDS[i]}" ] || pids+=("${HA_PIDS[i]}"); done
  [ ${#pids[@]} -eq 0 ] || _stop_reap 30 "${pids[@]}"
  HA_PIDS=()
}

# ha_members [I]: `wasmctl cluster members` as member I (default 1) answers it (the leader
# knows every member's lag; a follower only its own): ID ADDRESS ROLE TERM APPLIED LAG.
ha_members() {
  "$WASMCTL_BIN" --kubeconfig "${HA_DIRS[${1:-1}]}/kubeconfig.yaml" cluster members
}

# ha_member_of ADDRESS: the number i of the member listening on ADDRESS (empty if none).
ha_member_of() {
  local i
  for i in "${!HA_ADDRS[@]}"; do [ "${HA_ADDRS[i]}" != "$1" ] || echo "$i"; done
}

# ha_leader: the number i of the member that leads, as the first member that answers sees
# it; fails while there is none (or it is not one of HA_ADDRS).
ha_leader() {
  local i addr
  for i in "${!HA_ADDRS[@]}"; do
    [ -n "${HA_PIDS[i]:-}" ] || continue
    addr=$(ha_members "$i" 2>/dev/null | awk 'NR > 1 && $3 == "leader" { print $2 }') || continue
    [ -n "$addr" ] || continue
    i=$(ha_member_of "$addr")
    [ -n "$i" ] && echo "$i" && return 0
  done
  return 1
}

# ha_has_voters N [I]: member I (default 1) lists N voters, one of them the leader.
ha_has_voters() {
  ha_members "${2:-1}" 2>/dev/null | awk -v n="$1" '
    NR > 1 && ($3 == "leader" || $3 == "follower") { v++ }
    NR > 1 && $3 == "leader" { l++ }
    END { exit !(v == n && l == 1) }'
}

# _ha_first_ready: member 1 wrote its join token and answers.
_ha_first_ready() { [ -s "${HA_DIRS[1]}/token" ] && ha_members 1; }

# ha_cluster_start DIR N: a wasmctl HA control plane of N `wasmctl server` processes: member
# 1 with --cluster-init, then members 2..N with --join https://HA_ADDRS[1] --token (member 1's
# DIR/s1/token); waits (60 s each) until member 1 answers and then until N voters are listed.
ha_cluster_start() {
  local dir=$1 n=$2 i port ips=()
  HA_BASE=$dir
  mkdir -p "$dir"
  for ((i = 1; i <= n; i++)); do ips+=("127.0.12.$i"); done
  port=$(free_ports 1 "${ips[@]}")
  for ((i = 1; i <= n; i++)); do
    HA_ADDRS[i]="127.0.12.$i:$port"
    HA_DIRS[i]="$dir/s$i"
  done
  ha_member_start 1 --cluster-init
  wait_for 60 _ha_first_ready || {
    echo "wasmctl member 1 (${HA_ADDRS[1]}) did not answer within 60 s; its log:" >&2
    tail -n 30 "$dir/s1.log" >&2
    exit 1
  }
  for ((i = 2; i <= n; i++)); do
    ha_member_start "$i" --join "https://${HA_ADDRS[1]}" --token "$(cat "${HA_DIRS[1]}/token")"
  done
  wait_for 60 ha_has_voters "$n" || {
    echo "the wasmctl cluster did not list $n voters within 60 s:" >&2
    ha_members 1 >&2 || true
    for ((i = 2; i <= n; i++)); do echo "member $i's log:" >&2; tail -n 20 "$dir/s$i.log" >&2; done
    exit 1
  }
  # Every member's own kubeconfig exists once it serves.
  for ((i = 2; i <= n; i++)); do
    wait_for 60 ha_members "$i" || { echo "wasmctl member $i does not answer" >&2; exit 1; }
  done
}
