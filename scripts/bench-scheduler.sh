#!/usr/bin/env bash
# Scheduler throughput benchmark (issue 4): `examples/schedbench.rs` on a real store (RocksDB +
# openraft, fsync on) in a temp dir: NODES fake nodes, PODS pending pods, scheduling passes
# until all are bound, every pass end to end (list from the store, decide, write through Raft);
# then every binding is verified against the nodes' allocatable. Run twice, each on a fresh
# store: the batched pass (up to 1,000 bindings per Raft entry), then the loop as it was before
# (one `binding` write, i.e. one Raft entry, per pod). Prints the runs and a markdown table.
#   BENCH_NODES (1000), BENCH_PODS (10000), BENCH_PODS_BIND_EACH (10000; 0 skips)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
wasmctl_build --example schedbench
SCHEDBENCH="$CARGO_TARGET_DIR/debug/examples/schedbench"
NODES="${BENCH_NODES:-1000}"; PODS="${BENCH_PODS:-10000}"; EACH="${BENCH_PODS_BIND_EACH:-10000}"
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

echo "$(nproc) cores; $(uptime | sed 's/.*load average/load average/')"
NODES="$NODES" PODS="$PODS" MODE=batched "$SCHEDBENCH" | tee -a "$OUT"
if [ "$EACH" -gt 0 ]; then
  NODES="$NODES" PODS="$EACH" MODE=bind-each "$SCHEDBENCH" | tee -a "$OUT"
fi

echo
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| mode | nodes | pods | Raft entries | passes | wall | CPU | pods/s | list | decide | write |")
print("|------|------:|-----:|-------------:|-------:|-----:|----:|-------:|-----:|-------:|------:|")
for r in rows:
    print(f"| {r['mode']} | {r['nodes']} | {r['bound']} | {r['raft_entries']} | {r['passes']} | "
          f"{r['wall_s']} s | {r['cpu_s']} s | {r['pods_per_s']:.0f} | {r['list_s']} s | "
          f"{r['decide_s']} s | {r['write_s']} s |")
PY
