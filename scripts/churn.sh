#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup runs through the trap
# Churn: does anything leak when paths and sessions come and go? On each
# fabric, an RNBD server (`rtrs serve`, one poll core) and a client
# (`rtrs-perf client`, verified random reads and writes over two paths) run
# throughout, while
#   - path 2 of the client is disconnected and reconnected CYCLES times
#     through the client's control socket (the kernel's sysfs disconnect /
#     reconnect; reconnect delay and backoff 0), and
#   - a second client process opens and closes SESSIONS sessions one after
#     another (`--churn-sessions`: each every path up, its RNBD device
#     open, 64 verified IOs, closed).
# The census of both processes (`rtrs ctl stats`: descriptors, VmRSS,
# VmHWM, hugepages, the fabric's live PDs/MRs/CQs/QPs/MWs/shm regions) is
# taken before and after and printed as a table; what must hold:
# descriptors, fabric objects and hugepages exactly as before, resident
# memory within CHURN_RSS_TOL_KB, every IO verified with no error, lost or
# doubled, every session opened and closed, every cycle back up.
#
#   scripts/churn.sh [tcp] [shm] [rdma]     default: tcp shm
#     rdma: in the VM (scripts/vm.sh, soft-RoCE; needs root), 50 cycles and
#     20 sessions unless CHURN_CYCLES / CHURN_SESSIONS say
#   env: CHURN_CYCLES (1000), CHURN_SESSIONS (200), CHURN_RSS_TOL_KB (8192),
#        CHURN_OUT (a file the tables are appended to), CHURN_BIN (the
#        directory of rtrs and rtrs-perf: no build)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

FABRICS=("$@")
[ ${#FABRICS[@]} -gt 0 ] || FABRICS=(tcp shm)
OUT=${CHURN_OUT:-}
# Resident memory may end a little above where it began: glibc keeps freed
# heap in its per-thread arenas (up to 8 x cores of them: every control
# and socket thread may have had one) instead of returning it, and a
# session's first use of a code path faults pages of the binary in for
# good. 8 MiB is four 2 MiB arena heaps; a leak of a connection's memory
# (a 64-chunk session holds 8 MiB of chunks alone) per cycle would exceed
# it many times over in 1000 cycles.
RSS_TOL=${CHURN_RSS_TOL_KB:-8192}

if [[ " ${FABRICS[*]} " == *" rdma "* && -z "${CHURN_GUEST:-}" ]]; then
  # The rdma mode runs this script in the VM, on soft-RoCE.
  [ ${#FABRICS[@]} -eq 1 ] || { echo "churn.sh: rdma runs alone (in the VM)" >&2; exit 2; }
  need_root "scripts/vm.sh"
  build_bins
  guest=$(mktemp /tmp/rtrs-churn-guest.XXXXXX.sh)
  trap 'rm -f "$guest"' EXIT
  cat >"$guest" <<GUEST
set -e
export CHURN_GUEST=1 CHURN_BIN=$PWD/target/release CHURN_CYCLES=${CHURN_CYCLES:-50} \\
  CHURN_SESSIONS=${CHURN_SESSIONS:-20} CHURN_RSS_TOL_KB=$RSS_TOL
rdma link add rxe0 type rxe netdev eth0
cd $PWD
scripts/churn.sh rdma
GUEST
  chmod 644 "$guest"
  VM_TIMEOUT=${VM_TIMEOUT:-1200} scripts/vm.sh "$guest"
  exit $?
fi

CYCLES=${CHURN_CYCLES:-1000}
SESSIONS=${CHURN_SESSIONS:-200}
BIN=$(bin_dir "${CHURN_BIN:-}")
RTRS_GUEST=${CHURN_GUEST:-} need_tools jq python3
# The guest's / is the host's, read-only: temporary files go to /run there.
TMPD=${CHURN_GUEST:+/run}
WORK=$(mktemp -d "${TMPD:-/tmp}/rtrs-churn.XXXXXX")
SRV_PID=
CLT_PID=
CHURN_PID=

CASE_PIDS=()
CYC_PID=

# A case's processes (in its subshell), then the cases (in the script).
stop_case() {
  stop_pid "$CYC_PID"
  stop_pid "$CHURN_PID"
  stop_pid "$CLT_PID"
  stop_pid "$SRV_PID"
}
# Every process a case starts is also listed in $WORK/pids: a case
# stopped before it could stop its own leaves none behind.
track() { echo "$1" >>"$WORK/pids"; }
cleanup() {
  local p
  for p in "${CASE_PIDS[@]}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null; done
  stop_case
  if [ -e "$WORK/pids" ]; then
    for p in $(tac "$WORK/pids"); do stop_pid "$p"; done
  fi
  for p in "${CASE_PIDS[@]}"; do stop_pid "$p"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Poll cores: the server's on CPU 1, the clients' on CPU 0, all SCHED_IDLE
# so that the control threads (and this script) run first on a 2-CPU host.
SCHED=(--poll-sched idle)
IO=(--rw randrw --verify --bs 4k --iodepth 8 --cores 0 "${SCHED[@]}" --reconnect-delay 0
  --reconnect-backoff 0 --connect-timeout 10 --json)

case_churn() { # fabric
  local fab=$1 a1 a2 rc=0
  case $fab in
    tcp) a1=tcp:127.0.0.1:$(free_port) a2=tcp:127.0.0.1:$(free_port) ;;
    shm) a1=shm:rtrs-churn-$$-a a2=shm:rtrs-churn-$$-b ;;
    # In the guest (a python start there takes seconds): fixed ports.
    rdma) a1=rdma:10.0.2.15:17901 a2=rdma:10.0.2.15:17902 ;;
    *) echo "churn.sh: no fabric $fab (tcp, shm, rdma)" >&2; return 2 ;;
  esac
  local w=$WORK/$fab
  mkdir -p "$w"
  # Small sessions (64 chunks of 128 KiB): the churn is in connections.
  serve_start "$BIN" "$w/srv.sock" "$w/srv.log" --listen "$a1,$a2" --cores 1 "${SCHED[@]}" \
    --queue-depth 64 --export d0=ram:64M --export c0=ram:64M --export cchurn=ram:64M || return 1
  track "$SRV_PID"
  # A first session makes what the server keeps for good (the tcp fabric's
  # socket watcher, say): the idle baseline is after it.
  # (Its IO is not what is checked: on a loaded host an idle-scheduled
  # core may not get to any in its second.)
  "$BIN/rtrs-perf" client --connect "$a1,$a2" --rnbd-device 'd{}' "${IO[@]}" --runtime 1 \
    >/dev/null 2>"$w/warmup.log" || true
  census_idle "$BIN" "$w/srv.sock" "$w/srv0.json" 10
  "$BIN/rtrs-perf" client --connect "$a1,$a2" --rnbd-device 'd{}' "${IO[@]}" --runtime 3600 \
    --ctl "$w/clt.sock" --ready "$w/ready" >"$w/clt.json" 2>"$w/clt.log" &
  CLT_PID=$!
  track "$CLT_PID"
  wait_ready "$w/ready" "$CLT_PID" 60 || { tail -20 "$w/clt.log" >&2; return 1; }
  census_json "$BIN" "$w/srv.sock" >"$w/srv1.json"
  census_json "$BIN" "$w/clt.sock" >"$w/clt1.json"
  local t0=$SECONDS
  "$BIN/rtrs-perf" client --connect "$a1,$a2" --rnbd-device 'c{}' --sessname churn "${IO[@]}" \
    --runtime 1 --churn-sessions "$SESSIONS" >"$w/churn.json" 2>"$w/churn.log" &
  CHURN_PID=$!
  track "$CHURN_PID"
  # The first and the last cycle through `rtrs ctl` itself; the others
  # over the same socket from one process (an `rtrs ctl` start costs ~25 ms
  # of CPU, minstant's TSC calibration: 2,000 of them would be most of
  # this script's time).
  "$BIN/rtrs" ctl --socket "$w/clt.sock" disconnect path1 >/dev/null
  "$BIN/rtrs" ctl --socket "$w/clt.sock" reconnect path1 >/dev/null
  # (In the background, waited for: a TERM to this case stops it at once.)
  python3 scripts/churn-cycles.py "$w/clt.sock" path1 $((CYCLES - 2)) >"$w/cycles.json" &
  CYC_PID=$!
  track "$CYC_PID"
  wait "$CYC_PID"
  CYC_PID=
  "$BIN/rtrs" ctl --socket "$w/clt.sock" disconnect path1 >/dev/null
  "$BIN/rtrs" ctl --socket "$w/clt.sock" reconnect path1 >/dev/null
  local cycles_secs=$((SECONDS - t0))
  wait "$CHURN_PID" || rc=$?
  CHURN_PID=
  echo "churn client exit $rc" >>"$w/churn.log"
  # Compared once the torn-down connections are freed (at most 10 s).
  census_settled "$BIN" "$w/srv.sock" "$w/srv1.json" "$w/srv2.json" 10
  census_settled "$BIN" "$w/clt.sock" "$w/clt1.json" "$w/clt2.json" 10
  stop_pid "$CLT_PID"
  CLT_PID=
  # The server lets go of the client's session (its paths' teardown).
  census_settled "$BIN" "$w/srv.sock" "$w/srv0.json" "$w/srv3.json" 10
  stop_pid "$SRV_PID"
  SRV_PID=
  judge "$fab" "$w" "$cycles_secs"
}

# The table and the verdict.
judge() { # fabric dir cycles-secs
  python3 - "$1" "$2" "$3" "$RSS_TOL" "$CYCLES" "$SESSIONS" <<'EOF'
import json, sys
fab, w, cyc_secs, tol, cycles, sessions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def load(name):
    return json.loads(open(f"{w}/{name}").read().strip().splitlines()[-1])
c = {k: load(f"{k}.json") for k in ["srv0", "srv1", "srv2", "srv3", "clt1", "clt2"]}
main = load("clt.json")
churn = load("churn.json")
cyc = load("cycles.json")
ch = churn.get("churn") or {}
rows = [
    ("server, idle, warmed up", c["srv0"]),
    ("server, client up", c["srv1"]),
    ("server, after the churn", c["srv2"]),
    ("server, idle, after", c["srv3"]),
    ("client, up", c["clt1"]),
    ("client, after the churn", c["clt2"]),
    ("client, in-process: up", main["census"]["up"]),
    ("client, in-process: end", main["census"]["end"]),
    ("churner, after session 1", ch.get("census_first") or {}),
    ("churner, after the last", ch.get("census_last") or {}),
]
cols = ["fds", "vm_rss_kb", "vm_hwm_kb", "huge_free", "huge_rsvd", "huge_held"]
fcols = ["pds", "mrs", "cqs", "qps", "mws", "regions"]
def val(x, k):
    if k in fcols:
        return x.get("fabric", {}).get(k, "")
    return x.get(k, "")
print(f"== churn {fab}: {cyc['cycles'] + 2} path cycles (disconnect + reconnect of path1 of 2) "
      f"in {cyc_secs} s (disconnect p50 {cyc['disconnect_ms_p50']} ms, reconnect p50 "
      f"{cyc['reconnect_ms_p50']} ms, max {cyc['reconnect_ms_max']} ms); "
      f"{ch.get('done', 0)} of {sessions} sessions opened and closed in {ch.get('secs', 0):.1f} s "
      f"(open p50 {ch.get('open_ms_p50', 0):.1f} ms, max {ch.get('open_ms_max', 0):.1f} ms)")
head = f"  {'':26}" + "".join(f"{k:>10}" for k in cols + fcols) + f"{'sessions':>9}"
print(head)
for name, x in rows:
    print(f"  {name:26}" + "".join(f"{val(x, k)!s:>10}" for k in cols + fcols)
          + f"{x.get('sessions', '')!s:>9}")
fails = []
def check(ok, what):
    if not ok:
        fails.append(what)
def same(a, b, what):
    for k in ["fds", "huge_free", "huge_rsvd", "huge_held"]:
        check(a.get(k) == b.get(k), f"{what}: {k} {a.get(k)} -> {b.get(k)}")
    for k in fcols:
        check(a["fabric"][k] == b["fabric"][k], f"{what}: {k} {a['fabric'][k]} -> {b['fabric'][k]}")
    d = b["vm_rss_kb"] - a["vm_rss_kb"]
    check(d <= tol, f"{what}: VmRSS grew {d} KiB (tolerance {tol} KiB)")
    return d
deltas = [
    ("server, client up", same(c["srv1"], c["srv2"], "server with the client up")),
    ("server, idle", same(c["srv0"], c["srv3"], "idle server")),
    ("client", same(c["clt1"], c["clt2"], "client")),
]
if ch.get("census_first") and ch.get("census_last"):
    deltas.append(("churner", same(ch["census_first"], ch["census_last"], "churner")))
check(c["srv3"]["sessions"] == 0 and c["srv3"]["chunk_memory"] == 0, "the idle server still holds a session")
for who, s in (("client", main), ("churner", churn)):
    check(s["errors"] == 0, f"{who}: {s['errors']} IO errors {s['errors_by_errno']}")
    check(s["verify_failures"] == 0, f"{who}: {s['verify_failures']} blocks read back wrong")
    check(s["duplicates"] == 0, f"{who}: {s['duplicates']} IOs completed twice")
    check(s["submitted"] == s["completed"], f"{who}: {s['submitted'] - s['completed']} IOs lost")
check(ch.get("done") == sessions and ch.get("failed") == 0 and ch.get("lost") == 0,
      f"churn sessions: {ch.get('done')} of {sessions} done, {ch.get('failed')} failed "
      f"({ch.get('first_failure')}), {ch.get('lost')} IOs lost")
check(cyc["cycles"] == cycles - 2 and cyc["not_back"] == 0 and cyc["disconnect_failed"] == 0
      and cyc["reconnect_failed"] == 0, f"path cycles: {cyc}")
p1 = main["paths"][1]
check(p1["state"] == "connected", f"path1 ends {p1['state']}")
check(p1["reconnects"] >= cycles, f"path1 reconnected {p1['reconnects']} times, not {cycles}")
print(f"  RSS growth (KiB): " + ", ".join(f"{n} {d:+d}" for n, d in deltas) + f" (tolerance {tol})")
print(f"  client: {main['ios']} IOs verified, {main['errors']} errors, {main['failovers']} moved to path0, "
      f"path1 reconnected {p1['reconnects']} times ({cyc['reconnect_refused']} reconnects refused "
      f"while the server closed the last round: the client came back by itself)")
print(f"  churner: {churn['ios']} + {ch.get('ios', 0)} churn IOs verified, {churn['errors']} errors")
if fails:
    print(f"churn {fab}: FAIL: " + "; ".join(fails))
    sys.exit(1)
print(f"churn {fab}: ok")
EOF
}

# The fabrics side by side: a cycle's time is mostly the controls' waits
# (a command or an INFO message is seen at the next 10 ms control tick),
# not CPU, so two cases take little longer than one. Each case is a
# subshell that stops its own processes when it ends or is stopped.
failed=0
step "churn: ${FABRICS[*]}, $CYCLES path cycles and $SESSIONS sessions each, beside verified IO"
for f in "${FABRICS[@]}"; do
  (
    trap stop_case EXIT
    trap 'exit 130' INT TERM
    SRV_PID= CLT_PID= CHURN_PID= CYC_PID=
    case_churn "$f"
  ) >"$WORK/$f.out" 2>&1 &
  CASE_PIDS+=($!)
done
for i in "${!FABRICS[@]}"; do
  f=${FABRICS[$i]}
  rc=0
  wait "${CASE_PIDS[$i]}" || rc=$?
  CASE_PIDS[$i]=
  cat "$WORK/$f.out"
  if [ -n "$OUT" ]; then cat "$WORK/$f.out" >>"$OUT"; fi
  if [ $rc != 0 ]; then
    failed=1
    for l in "$WORK/$f"/*.log; do [ -e "$l" ] && { echo "-- $l"; tail -15 "$l"; }; done
  fi
done
exit $failed
