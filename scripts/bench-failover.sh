#!/usr/bin/env bash
# Failover benchmark, side by side in one run: a 3-member etcd 3.4 cluster (Debian's
# etcd-server, its default election settings: heartbeat 100 ms, election timeout 1000 ms) and a
# 3-member wasmctl HA control plane (its defaults: --raft-heartbeat 100ms
# --raft-election-timeout 300ms-600ms), one after the other, each under a steady open-loop write
# load through every member: BENCH_FAILOVERS times SIGKILL of the leader (restarted with the
# same command), then BENCH_FAILOVERS times SIGSTOP (SIGCONT once the others accept writes).
# Measured: from the signal to the first write accepted through another member, and through
# both; p50 and max per system and fault. The load generator and the process handling are
# examples/failover.rs (its docs list every setting).
#   BENCH_FAILOVERS (20)                   rounds per system and fault
#   BENCH_RAFT_HEARTBEAT (100ms)           wasmctl's --raft-heartbeat
#   BENCH_RAFT_ELECTION_TIMEOUT (300ms-600ms)  wasmctl's --raft-election-timeout
#   BENCH_ETCD_HEARTBEAT_MS (100), BENCH_ETCD_ELECTION_MS (1000)   etcd's
#   BENCH_FAILOVER_SYSTEMS ("etcd wasmctl"), BENCH_FAILOVER_FAULTS ("kill stop")
#   BENCH_FAILOVER_INTERVAL_MS (10)        one write per member every this many ms
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools etcd=etcd-server
wasmctl_build --bin wasmctl --example failover
bench_init
echo "etcd: $(etcd --version | head -1); wasmctl: $("$WASMCTL_BIN" --version)"
# In the background so that the EXIT trap can stop it (it kills its clusters as it ends).
"$CARGO_TARGET_DIR/debug/examples/failover" "$WORK/failover" &
bg_track $!
rc=0
wait $! || rc=$?
_bg_forget $!
[ "$rc" = 0 ] || { echo "failover benchmark failed ($rc); BENCH_KEEP=1 keeps its logs" >&2; exit "$rc"; }
