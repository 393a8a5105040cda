#!/usr/bin/env bash
# Store benchmark, side by side in one run: wasmctl (HTTPS API -> Raft -> RocksDB, fsync on)
# vs etcd 3.4 (Debian's etcd-server, v3 JSON gateway over HTTP, fsync on), both on loopback,
# same load generator, 1 and 64 concurrent clients, ~1 KB objects; then linearizable reads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools etcd=etcd-server
wasmctl_build --bin wasmctl --example loadgen
LOADGEN="$CARGO_TARGET_DIR/debug/examples/loadgen"
bench_init

etcd --data-dir "$WORK/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --log-level error >"$WORK/etcd.log" 2>&1 &
bg_track $!
server_start "$WORK/wasmctl"
wait_for 30 curl -sf http://127.0.0.1:23790/health \
  || { echo "etcd did not answer on 127.0.0.1:23790" >&2; cat "$WORK/etcd.log" >&2; exit 1; }
up_wait
echo "etcd: $(etcd --version | head -1); wasmctl: $("$WASMCTL_BIN" --version)"
for spec in "1 ${BENCH_REQ_1:-2000}" "64 ${BENCH_REQ_64:-20000}"; do
  # shellcheck disable=SC2086 # "CLIENTS REQUESTS", split on purpose
  set -- $spec
  E=$("$LOADGEN" etcd http://127.0.0.1:23790 "$1" "$2")
  W=$("$LOADGEN" wasmctl "$UP_KUBECONFIG" "$1" "$2")
  echo "$E"; echo "$W"
  python3 - "$E" "$W" <<'PY'
import sys
def parse(l): return {k: float(v) for k, v in (p.split("=") for p in l.split()[1:])}
e, w = parse(sys.argv[1]), parse(sys.argv[2])
print(f"  ratio wasmctl/etcd: writes/s {w['writes/s']/e['writes/s']:.2f}x, reads/s {w['reads/s']/e['reads/s']:.2f}x, "
      f"write p99 {w['write_p99_us']/e['write_p99_us']:.2f}x")
PY
done
