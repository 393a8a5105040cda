#!/usr/bin/env bash
# HA store benchmark, side by side in one run: a 3-member etcd 3.4 cluster (Debian's
# etcd-server, three processes on 127.0.0.1, fsync on, v3 JSON gateway over HTTP) vs a 3-member
# wasmctl HA control plane (three `wasmctl server` processes on 127.0.12.1-3, --cluster-init +
# --join, fsync on, HTTPS API -> Raft -> RocksDB). The same load generator (examples/loadgen.rs)
# at 1 and 64 concurrent clients, ~1 KB objects, against each cluster's leader and through a
# follower (wasmctl: writes forwarded to the leader, linearizable reads via the leader's read
# index; etcd: its own forwarding and ReadIndex).
#   BENCH_REQ_1 (2000) / BENCH_REQ_64 (20000): requests per phase
#   BENCH_WASMCTL_ARGS: extra `wasmctl server` arguments for every member (word-split)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools etcd=etcd-server
wasmctl_build --bin wasmctl --example loadgen
LOADGEN="$CARGO_TARGET_DIR/debug/examples/loadgen"
ha_init
# shellcheck disable=SC2206 # extra arguments, split on purpose
HA_ARGS=(${BENCH_WASMCTL_ARGS:-})

etcd_cluster_start "$WORK/etcd" 3
ha_cluster_start "$WORK/wasmctl" 3
EL=$(etcd_leader) || { echo "no etcd leader" >&2; exit 1; }
EF=$((EL % 3 + 1))
WL=$(ha_leader) || { echo "no wasmctl leader" >&2; exit 1; }
WF=$((WL % 3 + 1))
echo "etcd: $(etcd --version | head -1); wasmctl: $("$WASMCTL_BIN" --version)"
echo "etcd: leader e$EL (${ETCD_URLS[EL]}), follower e$EF; wasmctl: leader ${HA_ADDRS[WL]}, follower ${HA_ADDRS[WF]}"
ha_members "$WL"

for spec in "1 ${BENCH_REQ_1:-2000}" "64 ${BENCH_REQ_64:-20000}"; do
  # shellcheck disable=SC2086 # "CLIENTS REQUESTS", split on purpose
  set -- $spec
  EL_OUT=$("$LOADGEN" etcd "${ETCD_URLS[EL]}" "$1" "$2")
  WL_OUT=$("$LOADGEN" wasmctl "${HA_DIRS[WL]}/kubeconfig.yaml" "$1" "$2")
  EF_OUT=$("$LOADGEN" etcd "${ETCD_URLS[EF]}" "$1" "$2")
  WF_OUT=$("$LOADGEN" wasmctl "${HA_DIRS[WF]}/kubeconfig.yaml" "$1" "$2")
  echo "3x etcd,    via the leader:   $EL_OUT"
  echo "3x wasmctl, via the leader:   $WL_OUT"
  echo "3x etcd,    via a follower:   $EF_OUT"
  echo "3x wasmctl, via a follower:   $WF_OUT"
  python3 - "$EL_OUT" "$WL_OUT" "$EF_OUT" "$WF_OUT" <<'PY'
import sys
def parse(l): return {k: float(v) for k, v in (p.split("=") for p in l.split()[1:])}
el, wl, ef, wf = (parse(a) for a in sys.argv[1:])
for name, e, w in (("leader", el, wl), ("follower", ef, wf)):
    print(f"  ratio wasmctl/etcd via the {name}: writes/s {w['writes/s']/e['writes/s']:.2f}x, "
          f"write p50 {w['write_p50_us']/e['write_p50_us']:.2f}x, write p99 {w['write_p99_us']/e['write_p99_us']:.2f}x, "
          f"reads/s {w['reads/s']/e['reads/s']:.2f}x, read p99 {w['read_p99_us']/e['read_p99_us']:.2f}x")
print(f"  wasmctl follower/leader: writes/s {wf['writes/s']/wl['writes/s']:.2f}x, reads/s {wf['reads/s']/wl['reads/s']:.2f}x; "
      f"etcd follower/leader: writes/s {ef['writes/s']/el['writes/s']:.2f}x, reads/s {ef['reads/s']/el['reads/s']:.2f}x")
PY
done

# The leaders must not have changed during the runs (else the rows are not what they say).
[ "$(etcd_leader)" = "$EL" ] || echo "WARNING: the etcd leader changed during the run" >&2
[ "$(ha_leader)" = "$WL" ] || echo "WARNING: the wasmctl leader changed during the run" >&2
ha_members "$WL"
