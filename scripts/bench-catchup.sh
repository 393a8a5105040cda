#!/usr/bin/env bash
# Catch-up benchmark, side by side in one run: a 3-member wasmctl HA control plane and, as the
# anchor, a 3-member etcd 3.4 cluster (Debian's etcd-server), both fsync on, on loopback. Each
# gets BENCH_CATCHUP_OBJECTS ~1 KB objects (examples/loadgen.rs, 64 clients, through the
# leader); then one follower is replaced by a new member with an empty data dir, the way an
# operator replaces a lost disk:
#   wasmctl: stop it, `wasmctl cluster remove ID`, rm -rf its data dir, `wasmctl server --join`
#            again on the same address;
#   etcd:    stop it, member remove, member add (same name and peer URL), rm -rf its data dir,
#            start it with --initial-cluster-state existing.
# Measured, from the new process's start: until the leader lists it as a voter with lag 0 and
# its last applied index equal to the leader's (wasmctl, the leader's /internal/cluster/v1/
# members, what `wasmctl cluster members` prints), or until its raftAppliedIndex reaches the
# leader's (etcd, /v3/maintenance/status); plus the snapshot the leader built (wasmctl's log:
# "built snapshot ... bytes"), the new member's data dir size and etcd's dbSize.
#   BENCH_CATCHUP_OBJECTS (100000): objects written before the replacement
#   BENCH_WASMCTL_ARGS: extra `wasmctl server` arguments for every member (word-split), e.g.
#     "--snapshot-logs 1000" to make a small run go through a snapshot too
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_tools etcd=etcd-server
wasmctl_build --bin wasmctl --example loadgen
LOADGEN="$CARGO_TARGET_DIR/debug/examples/loadgen"
N=${BENCH_CATCHUP_OBJECTS:-100000}
LIMIT=${BENCH_CATCHUP_DEADLINE:-1800}
ha_init
# shellcheck disable=SC2206 # extra arguments, split on purpose
HA_ARGS=(${BENCH_WASMCTL_ARGS:-})

etcd_cluster_start "$WORK/etcd" 3
ha_cluster_start "$WORK/wasmctl" 3
TOKEN=$(cat "${HA_DIRS[1]}/token")
EL=$(etcd_leader) || { echo "no etcd leader" >&2; exit 1; }
WL=$(ha_leader) || { echo "no wasmctl leader" >&2; exit 1; }
EV=$((EL % 3 + 1))
WV=$((WL % 3 + 1))
echo "etcd: $(etcd --version | head -1); wasmctl: $("$WASMCTL_BIN" --version)"
echo "writing $N ~1 KB objects into each cluster through its leader (64 clients)"
echo "  $("$LOADGEN" etcd "${ETCD_URLS[EL]}" 64 "$N")"
echo "  $("$LOADGEN" wasmctl "${HA_DIRS[WL]}/kubeconfig.yaml" 64 "$N")"

strip_ansi() { sed 's/\x1b\[[0-9;]*m//g'; }

# ---- etcd: replace follower e$EV
etcd_api() { curl -sf -X POST "${ETCD_URLS[EL]}/v3/$1" -d "$2"; }
EV_ID=$(etcd_api cluster/member/list '{}' | python3 -c '
import json, sys
name = sys.argv[1]
print(next(m["ID"] for m in json.load(sys.stdin)["members"] if m.get("name") == name))' "e$EV")
etcd_member_stop "$EV"
etcd_api cluster/member/remove "{\"ID\": \"$EV_ID\"}" >/dev/null
etcd_api cluster/member/add "{\"peerURLs\": [\"${ETCD_PEER_URLS[EV]}\"]}" >/dev/null
rm -rf "${ETCD_BASE:?}/e$EV"
T0=$EPOCHREALTIME
etcd_member_start "$EV" --initial-cluster-state existing
E_OUT=$(python3 - "${ETCD_URLS[EL]}" "${ETCD_URLS[EV]}" "$T0" "$LIMIT" <<'PY'
import json, sys, time, urllib.request
leader, member, t0, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def status(url):
    req = urllib.request.Request(url + "/v3/maintenance/status", data=b"{}", method="POST")
    return json.load(urllib.request.urlopen(req, timeout=5))
def applied(s): return int(s.get("raftAppliedIndex") or s["raftIndex"])
serving = None
while True:
    if time.time() - t0 > limit:
        sys.exit(f"etcd: the new member did not catch up within {limit} s")
    try:
        l = status(leader)
        m = status(member)
    except Exception:
        time.sleep(0.05)
        continue
    now = time.time()
    serving = serving or now - t0
    if applied(m) >= applied(l):
        print(f"serving_after_s={serving:.3f} caught_up_after_s={now - t0:.3f} applied={applied(m)} "
              f"leader_applied={applied(l)} db_size={m.get('dbSize')} leader_db_size={l.get('dbSize')}")
        break
    time.sleep(0.05)
PY
)
echo "etcd catch-up of a new member (e$EV) behind $N objects: $E_OUT"
echo "  data dir: $(du -sb "$ETCD_BASE/e$EV" | cut -f1) bytes (the leader's: $(du -sb "$ETCD_BASE/e$EL" | cut -f1))"
etcd_cluster_stop

# ---- wasmctl: replace follower $WV
WV_ADDR=${HA_ADDRS[WV]}
WV_ID=$(ha_members "$WL" | awk -v a="$WV_ADDR" 'NR > 1 && $2 == a { print $1 }')
[ -n "$WV_ID" ] || { echo "member $WV_ADDR is not listed" >&2; ha_members "$WL" >&2; exit 1; }
ha_member_stop "$WV"
"$WASMCTL_BIN" --kubeconfig "${HA_DIRS[WL]}/kubeconfig.yaml" cluster remove "$WV_ID" >/dev/null
_removed() {
  local list
  list=$(ha_members "$WL") || return 1
  ! awk -v a="$WV_ADDR" 'NR > 1 && $2 == a { f = 1 } END { exit !f }' <<<"$list"
}
wait_for 60 _removed || { echo "member $WV_ID is still listed after its removal" >&2; exit 1; }
rm -rf "${HA_DIRS[WV]:?}"
LOG_LINES=$( (strip_ansi <"$HA_BASE/s$WV.log" || true) | wc -l)
T0=$EPOCHREALTIME
ha_member_start "$WV" --join "https://${HA_ADDRS[WL]}" --token "$TOKEN"
W_OUT=$(python3 - "https://${HA_ADDRS[WL]}" "${HA_DIRS[WL]}/pki/ca.crt" "${HA_DIRS[WL]}/pki/admin.token" \
  "$WV_ADDR" "$T0" "$LIMIT" <<'PY'
import json, ssl, sys, time, urllib.request
url, ca, token_path, victim, t0, limit = sys.argv[1:7]
t0, limit = float(t0), float(limit)
ctx = ssl.create_default_context(cafile=ca)
token = open(token_path).read().strip()
seen = {}
while True:
    if time.time() - t0 > limit:
        sys.exit(f"wasmctl: the new member did not catch up within {limit} s (roles seen: {seen})")
    try:
        req = urllib.request.Request(url + "/internal/cluster/v1/members",
                                     headers={"Authorization": "Bearer " + token})
        m = json.load(urllib.request.urlopen(req, context=ctx, timeout=5))
    except Exception:
        time.sleep(0.05)
        continue
    now = time.time()
    rows = m.get("members") or []
    lead = next((r for r in rows if r.get("id") == m.get("leader")), None)
    if lead is None:
        time.sleep(0.05)
        continue
    if "https://" + lead["address"] != url:  # the leadership moved: ask the leader
        url = "https://" + lead["address"]
        continue
    me = next((r for r in rows if r.get("address") == victim), None)
    if me is not None:
        seen.setdefault(me["role"], now - t0)
        if (me["role"] == "follower" and me.get("lag") == 0 and me.get("lastApplied") is not None
                and me["lastApplied"] == lead.get("lastApplied")):
            fmt = lambda k: f"{seen[k]:.3f}" if k in seen else "-"
            print(f"learner_after_s={fmt('learner')} voter_after_s={fmt('follower')} "
                  f"caught_up_after_s={now - t0:.3f} applied={me['lastApplied']} "
                  f"leader_applied={lead['lastApplied']}")
            break
    time.sleep(0.05)
PY
)
echo "wasmctl catch-up of a new member ($WV_ADDR) behind $N objects: $W_OUT"
echo "  data dir: $(du -sb "${HA_DIRS[WV]}" | cut -f1) bytes (the leader's: $(du -sb "${HA_DIRS[WL]}" | cut -f1))"
SNAP=$(strip_ansi <"$HA_BASE/s$WL.log" | grep "built snapshot" | tail -n 1 \
  | sed -n 's/^\([^ ]*\) .*last_log:\([^,]*\),.* bytes=\([0-9]*\).*/\3 bytes, last log id \2, built at \1/p' || true)
echo "  the leader's last snapshot: ${SNAP:-none built (fewer log entries than --snapshot-logs)}"
INSTALLED=$(strip_ansi <"$HA_BASE/s$WV.log" | tail -n +$((LOG_LINES + 1)) | grep -c "installing snapshot" || true)
echo "  snapshots the new member installed: $INSTALLED"
ha_members "$WL"
python3 - "$E_OUT" "$W_OUT" <<'PY'
import sys
def parse(l): return dict(p.split("=", 1) for p in l.split())
e, w = parse(sys.argv[1]), parse(sys.argv[2])
print(f"  ratio wasmctl/etcd: catch-up time {float(w['caught_up_after_s']) / float(e['caught_up_after_s']):.2f}x")
PY
