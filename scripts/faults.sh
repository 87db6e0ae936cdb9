#!/usr/bin/env bash
# shellcheck disable=SC2317 # the cases and helpers run through "$fn" and traps
# Real link faults: an rtrs-perf server and client in two network namespaces
# joined by two veth pairs (one per path), over the tcp fabric, with verified
# random reads and writes at QD32 on both paths while links are cut silently
# (a tbf black hole on both ends: no RST, no link event; this kernel has no
# netem), restored, both cut, and the server killed and restarted. Each case
# prints a timeline and checks what must hold. Needs root; exit 77 when it
# cannot run here.
#
#   scripts/faults.sh [CASE...]     cases: cut-one both-cut server-restart (default: all)
#   env: FAULTS_HB_MS (heartbeat interval, 500), FAULTS_HB_MISSED (5),
#        FAULTS_OUT (a file the timelines are appended to)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_root "network namespaces, veth, tc"
ensure_packages iproute2 python3
for t in ip tc python3; do
  command -v "$t" >/dev/null || skip "$t unavailable"
done

HB_MS=${FAULTS_HB_MS:-500}
HB_MISSED=${FAULTS_HB_MISSED:-5}
OUT=${FAULTS_OUT:-}
build_bins
PERF=$PWD/target/release/rtrs-perf
TAG=rf$$
NS_C=$TAG-c
NS_S=$TAG-s
WORK=$(mktemp -d /tmp/rtrs-faults.XXXXXX)
SRV_PID=
CLT_PID=

cleanup() {
  stop_pid "$CLT_PID"
  stop_pid "$SRV_PID"
  teardown_net
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# in_c, in_s, setup_net, teardown_net, link_cut, link_restore: scripts/lib.sh (on TAG, NS_C, NS_S).

PORT=17700
start_server() {
  # Not through in_s: a backgrounded function is a subshell, and its PID
  # would not be the server's. `ip netns exec` execs, keeping the PID.
  ip netns exec "$NS_S" "$PERF" server --listen "tcp:10.77.1.2:$PORT,tcp:10.77.2.2:$PORT" --allow 10.77.0.0/16 \
    --backend ram:64M --cores 1 --hb-interval-ms "$HB_MS" --hb-missed "$HB_MISSED" \
    2>>"$WORK/server.log" &
  SRV_PID=$!
  for _ in $(seq 100); do
    if in_s ss -ltn 2>/dev/null | grep -q "10.77.2.2:$PORT"; then return 0; fi
    kill -0 "$SRV_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; return 1; }
    sleep 0.1
  done
  echo "the server did not listen" >&2
  return 1
}

start_client() { # runtime extra-args... -> client in the background, JSON to $WORK/client.json
  local runtime=$1
  shift
  ip netns exec "$NS_C" "$PERF" client --connect "tcp:10.77.1.2:$PORT,tcp:10.77.2.2:$PORT" \
    --rw randrw --verify --bs 4k --iodepth 32 --size 64M --cores 0 --runtime "$runtime" \
    --hb-interval-ms "$HB_MS" --hb-missed "$HB_MISSED" --connect-timeout 2 --json "$@" \
    >"$WORK/client.json" 2>"$WORK/client.log" &
  CLT_PID=$!
}

wait_client() { # -> the client's exit status
  local rc=0
  wait "$CLT_PID" || rc=$?
  CLT_PID=
  return "$rc"
}

# Prints the case's timeline and checks it; the python reads the client's
# JSON (events with wall times) and the marks the script recorded.
judge() { # case marks-file client-rc
  python3 - "$1" "$2" "$3" "$WORK/client.json" "$WORK/client.log" "$HB_MS" "$HB_MISSED" \
    "$WORK/server.log" <<'EOF'
import json, sys
case, marks_f, rc, js, log, hb_ms, missed, srv_log = sys.argv[1:9]
rc, hb, missed = int(rc), int(hb_ms) / 1000.0, int(missed)
marks = {}
for line in open(marks_f):
    k, v = line.split()
    marks[k] = float(v)
try:
    s = json.loads(open(js).read().strip().splitlines()[-1])
except Exception as e:
    print(f"{case}: FAIL: no JSON summary from the client ({e})")
    print(open(log).read()[-3000:])
    sys.exit(1)
events = []
for e in s.get("events", []):
    parts = e.split(" ", 2)
    events.append((float(parts[1]), parts[2]))
t0 = marks.get("start", events[0][0] if events else 0)
def first(pred, after=0.0):
    for t, text in events:
        if t >= after and pred(text):
            return t
    return None
print(f"== {case}: timeline (s from the client's start)")
rows = [(v, k) for k, v in marks.items() if k != "start"]
rows += [(t, "event: " + text) for t, text in events]
for t, what in sorted(rows):
    print(f"  {t - t0:8.3f}  {what}")
errs = s["errors_by_errno"]
print(f"  ios={s['ios']} iops={s['iops']:.0f} errors={s['errors']} {errs} verify={s['verify_failures']} "
      f"twice={s['duplicates']} failovers={s['failovers']} downs={s['path_downs']} "
      f"reconnects={s['reconnects']} stalled={s['stalled_secs']:.2f}s rc={rc}")
fails = []
def check(ok, what):
    if not ok:
        fails.append(what)
check(s["verify_failures"] == 0, "a block read back wrong")
check(s["duplicates"] == 0, "an IO completed twice")
bound = hb * (missed + 2) + 1.0  # the kernel's 7th run of 5: interval x (missed + 2)
if case == "cut-one":
    cut = marks["cut"]
    down = first(lambda x: "path0" in x and ": down" in x, cut)
    check(down is not None, "the cut path was never declared down")
    if down is not None:
        d = down - cut
        print(f"  detected after {d:.3f} s (bound {bound:.1f} s)")
        check(d <= bound, f"detected after {d:.3f} s, beyond {bound:.1f} s")
    check(first(lambda x: "path1" in x and (": down" in x or "closed" in x)) is None,
          "the healthy path went down")
    healthy = s["paths"][1]
    print(f"  healthy path: missed beats in a row {healthy['hb_missed_peak']}, "
          f"last RTT {healthy['hb_rtt_ns'] / 1000:.0f} us")
    check(healthy["hb_missed_peak"] == 0, "the healthy path missed a heartbeat")
    # The server's events carry wall times: before the client ended, it
    # must not have closed the healthy path (10.77.2.x) for any reason.
    srv_closed = [l for l in open(srv_log)
                  if l.startswith("event ") and "closed" in l and "10.77.2." in l
                  and float(l.split()[1]) < (first(lambda x: "run over" in x) or marks["exited"])]
    check(not srv_closed, f"the server closed the healthy path: {srv_closed}")
    check(first(lambda x: "session lost" in x) is None, "the session was lost")
    up = first(lambda x: "path0" in x and "reconnected" in x, marks["restore"])
    check(up is not None, "the cut path did not come back after the restore")
    if up is not None:
        print(f"  reconnected {up - marks['restore']:.3f} s after the restore")
    check(s["errors"] == 0 and rc == 0, f"IO failed: {errs}, rc {rc}")
    check(s["reconnects"] >= 1, "no reconnect counted")
elif case == "both-cut":
    cut = marks["cut"]
    lost = first(lambda x: "session lost" in x, cut)
    check(lost is not None, "the session was never declared lost")
    if lost is not None:
        print(f"  session lost after {lost - cut:.3f} s")
    closed = first(lambda x: "every path is closed" in x, cut)
    check(closed is not None, "the paths did not close after their attempts")
    check(all(int(k) == -103 for k in errs), f"errors other than -ECONNABORTED: {errs}")
    check(rc != 0, "the run failed IO but exited 0")
    check(marks["exited"] - cut < 60, "the client took too long to give up")
elif case == "server-restart":
    kill = marks["kill"]
    lost = first(lambda x: "session lost" in x, kill)
    check(lost is not None, "the session was never declared lost")
    back = first(lambda x: "session reconnected" in x, marks["restart"])
    check(back is not None, "the session did not come back")
    if lost is not None and back is not None:
        print(f"  lost {lost - kill:.3f} s after the kill, back {back - marks['restart']:.3f} s after the restart")
    check(all(int(k) == -103 for k in errs), f"errors other than -ECONNABORTED: {errs}")
    check(s["errors"] <= 32, f"{s['errors']} failed: more than the 32 in flight at the kill")
    check(s["reconnects"] >= 1, "no reconnect counted")
if fails:
    print(f"{case}: FAIL: " + "; ".join(fails))
    print(open(log).read()[-3000:])
    sys.exit(1)
print(f"{case}: ok")
EOF
}

mark() { echo "$1 $(now)" >>"$WORK/marks"; }

case_cut_one() {
  : >"$WORK/marks"
  start_server || return 1
  mark start
  start_client 20 --reconnect-delay 2
  sleep 3
  mark cut; link_cut 1
  sleep 8
  mark restore; link_restore 1
  local rc=0
  wait_client || rc=$?
  mark exited
  stop_pid "$SRV_PID"; SRV_PID=
  judge cut-one "$WORK/marks" "$rc"
}

case_both_cut() {
  : >"$WORK/marks"
  start_server || return 1
  mark start
  start_client 60 --reconnect-delay 1 --max-reconnect-attempts 2
  sleep 3
  mark cut; link_cut 1; link_cut 2
  local rc=0
  wait_client || rc=$?
  mark exited
  link_restore 1; link_restore 2
  stop_pid "$SRV_PID"; SRV_PID=
  judge both-cut "$WORK/marks" "$rc"
}

case_server_restart() {
  : >"$WORK/marks"
  start_server || return 1
  mark start
  start_client 16 --reconnect-delay 1
  sleep 3
  mark kill; kill -KILL "$SRV_PID"; wait "$SRV_PID" 2>/dev/null || true; SRV_PID=
  sleep 2
  mark restart; start_server || return 1
  local rc=0
  wait_client || rc=$?
  stop_pid "$SRV_PID"; SRV_PID=
  # IO in flight at the kill failed (-ECONNABORTED): a non-zero exit is
  # expected; judge checks the errors are only those.
  judge server-restart "$WORK/marks" 0
}

setup_net
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(cut-one both-cut server-restart)
failed=0
for c in "${cases[@]}"; do
  fn="case_${c//-/_}"
  declare -F "$fn" >/dev/null || { echo "faults.sh: no case $c" >&2; exit 2; }
  step "fault case: $c (tcp, two paths, heartbeat ${HB_MS} ms x ${HB_MISSED})"
  : >"$WORK/server.log"
  # Run in this shell (not a subshell), so the trap sees every PID.
  "$fn" >"$WORK/case.out" 2>&1 || failed=1
  cat "$WORK/case.out"
  if [ -n "$OUT" ]; then cat "$WORK/case.out" >>"$OUT"; fi
done
exit $failed
