#!/usr/bin/env bash
# Cluster DNS benchmark (issue 5): one `wasmctl up` in a temp dir with BENCH_SERVICES (100)
# Services (named port `http`, ClusterIPs 127.96.1.x), then `dnsperf` against the agent's
# DNS and against `dnsmasq` serving the same records (--host-record / --srv-host, the same
# TTL), with the same query file (one A and one SRV query per Service), in the same run,
# alternating BENCH_ROUNDS (3) times. Prints one JSON line per dnsperf run (QPS, latency,
# and the server process's CPU time per query — for the agent that is the whole `wasmctl up`
# process, idle apart from DNS) and a summary line: best and median QPS of each, the ratio
# of the bests, the lowest CPU per query. Anchor: CoreDNS ≈ 17k QPS per core.
#   BENCH_SECONDS (10) per run, BENCH_CLIENTS (8) dnsperf clients, BENCH_OUTSTANDING (256)
#   queries in flight, BENCH_THREADS (1) dnsperf threads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# dnsmasq-base is the binary alone (the `dnsmasq` package also installs a system service).
need_tools dnsperf dnsmasq=dnsmasq-base dig=bind9-dnsutils
DNSMASQ=$(command -v dnsmasq || echo /usr/sbin/dnsmasq)
wasmctl_build --bin wasmctl
N="${BENCH_SERVICES:-100}"; ROUNDS="${BENCH_ROUNDS:-3}"; SECONDS_PER_RUN="${BENCH_SECONDS:-10}"
CLIENTS="${BENCH_CLIENTS:-8}"; OUTSTANDING="${BENCH_OUTSTANDING:-256}"; THREADS="${BENCH_THREADS:-1}"
[ "$N" -le 250 ] || { echo "BENCH_SERVICES must be <= 250" >&2; exit 2; }
bench_init

up_start "$WORK" --pod-cidr 127.79.0.0/16 --dns-listen 127.0.0.1:0
up_wait "cluster DNS listening on"
AGENT_DNS=$(sed -n 's/^cluster DNS listening on \([0-9.]*:[0-9]*\).*/\1/p' "$UP_OUT")
AGENT_PORT=${AGENT_DNS##*:}

# N Services, one manifest.
for i in $(seq 0 $((N - 1))); do
  printf -- '---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-%03d\nspec:\n  clusterIP: 127.96.1.%d\n  selector:\n    app: svc-%03d\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n' \
    "$i" $((i + 1)) "$i"
done >"$WORK/services.yaml"
wctl apply -f "$WORK/services.yaml" >/dev/null

# The records as the API server has them (name, clusterIP) — dnsmasq gets the same.
wctl get services -n default -o json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["items"]:
    if s["metadata"]["name"].startswith("svc-"):
        print(s["metadata"]["name"], s["spec"]["clusterIP"])' >"$WORK/records.txt"
[ "$(wc -l <"$WORK/records.txt")" -eq "$N" ] || { echo "expected $N services" >&2; exit 1; }

MASQ_PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MASQ_ARGS=(--no-daemon --port "$MASQ_PORT" --listen-address 127.0.0.1 --bind-interfaces --no-resolv
  --no-hosts --local=/cluster.local/ --local-ttl=5 --log-facility=- --user=root)
while read -r name ip; do
  fqdn="$name.default.svc.cluster.local"
  echo "$fqdn A" >>"$WORK/queries.txt"
  echo "_http._tcp.$fqdn SRV" >>"$WORK/queries.txt"
  MASQ_ARGS+=("--host-record=$fqdn,$ip" "--srv-host=_http._tcp.$fqdn,$fqdn,80,0,100")
done <"$WORK/records.txt"
"$DNSMASQ" "${MASQ_ARGS[@]}" >"$WORK/dnsmasq.log" 2>&1 &
MASQ_PID=$!
bg_track "$MASQ_PID"

# Both answer the last Service the same way (the agent may still be catching up).
last=$(tail -1 "$WORK/records.txt" | cut -d' ' -f1).default.svc.cluster.local
for _ in $(seq 1 100); do
  a=$(dig @127.0.0.1 -p "$AGENT_PORT" +short +time=1 +tries=1 "$last" || true)
  m=$(dig @127.0.0.1 -p "$MASQ_PORT" +short +time=1 +tries=1 "$last" || true)
  [ -n "$a" ] && [ "$a" = "$m" ] && break
  sleep 0.1
done
# shellcheck disable=SC2015 # the block runs when either test fails
[ -n "$a" ] && [ "$a" = "$m" ] || { echo "agent ($a) and dnsmasq ($m) disagree on $last" >&2; cat "$WORK/dnsmasq.log" >&2; exit 1; }
sa=$(dig @127.0.0.1 -p "$AGENT_PORT" +short "_http._tcp.$last" SRV)
sm=$(dig @127.0.0.1 -p "$MASQ_PORT" +short "_http._tcp.$last" SRV)
[ "$sa" = "$sm" ] || { echo "SRV differs: agent '$sa' dnsmasq '$sm'" >&2; exit 1; }

# CPU time (user + system, clock ticks) a process used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run SYSTEM PORT PID: one dnsperf run, one JSON line (with the server's CPU per query: the
# figure that other load on the machine disturbs least).
run() {
  local c0 c1
  c0=$(cpu_ticks "$3")
  dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -c "$CLIENTS" \
    -T "$THREADS" -q "$OUTSTANDING" >"$WORK/perf.out" 2>&1 || true
  c1=$(cpu_ticks "$3")
  python3 - "$1" "$WORK/perf.out" "$N" "$((c1 - c0))" "$(getconf CLK_TCK)" <<'PY'
import json, re, sys
system, path, n, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = open(path).read()
def grab(p, conv=float):
    m = re.search(p, t)
    return conv(m.group(1)) if m else None
print(json.dumps({
    "bench": "dns", "system": system, "services": n,
    "qps": grab(r"Queries per second:\s+([\d.]+)"),
    "completed": grab(r"Queries completed:\s+(\d+)", int),
    "lost": grab(r"Queries lost:\s+(\d+)", int),
    "avg_latency_ms": round(grab(r"Average Latency \(s\):\s+([\d.]+)") * 1000, 3) if grab(r"Average Latency \(s\):\s+([\d.]+)") is not None else None,
    "latency_stddev_ms": round(grab(r"Latency StdDev \(s\):\s+([\d.]+)") * 1000, 3) if grab(r"Latency StdDev \(s\):\s+([\d.]+)") is not None else None,
    "server_cpu_s": round(ticks / hz, 2),
    "server_cpu_us_per_query": round(ticks / hz / grab(r"Queries completed:\s+(\d+)", int) * 1e6, 2) if grab(r"Queries completed:\s+(\d+)", int) else None,
    "rcodes": (re.search(r"Response codes:\s+(.*)", t).group(1).strip() if re.search(r"Response codes:\s+(.*)", t) else None),
}))
PY
}

for _ in $(seq 1 "$ROUNDS"); do
  run "wasmctl agent" "$AGENT_PORT" "$UP_PID" | tee -a "$WORK/results.jsonl"
  run "dnsmasq" "$MASQ_PORT" "$MASQ_PID" | tee -a "$WORK/results.jsonl"
done
python3 - "$WORK/results.jsonl" "$(nproc)" <<'PY'
import json, sys
import statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def of(system, key):
    return [r[key] for r in rows if r["system"] == system and r[key] is not None]
def stat(f, system, key):
    v = of(system, key)
    return round(f(v), 2) if v else None
a, m = stat(max, "wasmctl agent", "qps"), stat(max, "dnsmasq", "qps")
ca, cm = stat(min, "wasmctl agent", "server_cpu_us_per_query"), stat(min, "dnsmasq", "server_cpu_us_per_query")
print(json.dumps({
    "bench": "dns summary", "cores": int(sys.argv[2]),
    "wasmctl_qps_best": a, "dnsmasq_qps_best": m,
    "wasmctl_qps_median": stat(statistics.median, "wasmctl agent", "qps"),
    "dnsmasq_qps_median": stat(statistics.median, "dnsmasq", "qps"),
    "ratio_wasmctl_over_dnsmasq": round(a / m, 2) if a and m else None,
    "wasmctl_cpu_us_per_query_best": ca, "dnsmasq_cpu_us_per_query_best": cm,
    "coredns_anchor_qps": 17000 * int(sys.argv[2]), "goal_qps": 100000,
}))
PY
