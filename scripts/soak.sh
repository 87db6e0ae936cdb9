#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup and the faults run through the trap and "$fn"
# Soak: SOAK_SECS (1800) of verified random reads and writes (rtrs-perf
# client --rw randrw --verify, QD 16) over 2 paths to `rtrs serve`, with a
# fault every SOAK_GAP_MIN..SOAK_GAP_MAX s (5..15), picked at random:
#   client-disconnect  a path closed through the client's control socket
#                      (`rtrs ctl disconnect`), reconnected 1-4 s later
#   server-disconnect  a path closed by the server (`rtrs ctl disconnect`
#                      on the server's socket): the client reconnects it
#   server-restart     the server killed (SIGKILL, by PID), started again
#                      1-3 s later
#   link-cut           (tcp) one of the two links cut silently (a tbf black
#                      hole at both ends, as scripts/faults.sh), restored 3-8 s
#                      later: found by the heartbeat (500 ms x 5)
# Each fault waits for both paths to be connected again before the next: its
# recovery, at most 60 s, counted from the end of the fault (the reconnect
# asked for, the new server listening, the link restored; a server's
# disconnect: from the disconnect). Over tcp the server and the client are in
# two network namespaces joined by two veth links (needs root); over shm
# they share this host (no link cuts). Prints the IO rate a minute, every
# fault with its recovery, and the summary; fails on a verify mismatch, a
# lost or doubled IO, an error other than -ECONNABORTED of IO in flight at
# a server kill, or a fault not recovered. Not in the test command.
#
#   scripts/soak.sh [tcp|shm]           default: tcp
#   env: SOAK_SECS (1800), SOAK_GAP_MIN / SOAK_GAP_MAX (5 / 15), SOAK_SEED
#        ($RANDOM's seed), SOAK_OUT (a file the report is appended to),
#        SOAK_BIN (no build)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

FAB=${1:-tcp}
SECS=${SOAK_SECS:-1800}
GAP_MIN=${SOAK_GAP_MIN:-5}
GAP_MAX=${SOAK_GAP_MAX:-15}
RANDOM=${SOAK_SEED:-$$}
OUT=${SOAK_OUT:-}
QD=16
case $FAB in
  tcp)
    need_root "network namespaces, veth, tc"
    for t in ip tc; do command -v "$t" >/dev/null || skip "$t unavailable"; done
    ;;
  shm) ;;
  *) echo "soak.sh: no fabric $FAB (tcp, shm)" >&2; exit 2 ;;
esac
need_tools jq python3
BIN=$(bin_dir "${SOAK_BIN:-}")
TAG=rk$$
NS_C=$TAG-c
NS_S=$TAG-s
W=$(mktemp -d /tmp/rtrs-soak.XXXXXX)
SRV_PID=
CLT_PID=
SAMPLER_PID=

cleanup() {
  stop_pid "$SAMPLER_PID"
  stop_pid "$CLT_PID"
  stop_pid "$SRV_PID"
  if [ "$FAB" = tcp ]; then teardown_net; fi
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$(now) $*" >>"$W/faults"; }
pick() { echo $(($1 + RANDOM % ($2 - $1 + 1))); } # LO HI

if [ "$FAB" = tcp ]; then
  setup_net
  ADDRS=tcp:10.77.1.2:17750,tcp:10.77.2.2:17750
  SERVE_IN=(ip netns exec "$NS_S")
  CLIENT_IN=(ip netns exec "$NS_C")
  FAULTS=(client-disconnect server-disconnect server-restart link-cut)
else
  ADDRS=shm:rtrs-soak-$$-a,shm:rtrs-soak-$$-b
  SERVE_IN=()
  CLIENT_IN=()
  FAULTS=(client-disconnect server-disconnect server-restart)
fi
HB=(--hb-interval-ms 500 --hb-missed 5)

server() {
  serve_start "$BIN" "$W/srv.sock" "$W/srv.log" --listen "$ADDRS" --cores 1 --poll-sched idle \
    --queue-depth 64 --export d0=ram:256M --allow 10.77.0.0/16 "${HB[@]}"
}

paths_up() { # -> how many paths of the client are connected
  "$BIN/rtrs" ctl --json --socket "$W/clt.sock" list paths 2>/dev/null |
    jq '[.data.paths[] | select(.state == "connected")] | length' 2>/dev/null || echo 0
}

# Waits for both paths; records the recovery (s since T0) or its failure.
recovered() { # kind t0
  local deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    if [ "$(paths_up)" = 2 ]; then
      log "recovered $1 $(awk "BEGIN { print $(now) - $2 }")"
      return 0
    fi
    sleep 0.1
  done
  log "unrecovered $1"
  return 1
}

fault_client_disconnect() {
  local p=path$((RANDOM % 2)) t0
  log "fault client-disconnect $p"
  "$BIN/rtrs" ctl --socket "$W/clt.sock" disconnect "$p" >/dev/null
  sleep "$(pick 1 4)"
  t0=$(now)
  "$BIN/rtrs" ctl --socket "$W/clt.sock" reconnect "$p" >/dev/null 2>&1 || true
  recovered client-disconnect "$t0"
}

fault_server_disconnect() {
  local id t0
  id=$("$BIN/rtrs" ctl --json --socket "$W/srv.sock" list paths | jq -r ".data[$((RANDOM % 2))].id")
  t0=$(now)
  log "fault server-disconnect $id"
  "$BIN/rtrs" ctl --socket "$W/srv.sock" disconnect "$id" >/dev/null
  recovered server-disconnect "$t0"
}

fault_server_restart() {
  local t0
  log "fault server-restart"
  kill -KILL "$SRV_PID"
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=
  sleep "$(pick 1 3)"
  server
  t0=$(now)
  recovered server-restart "$t0"
}

fault_link_cut() {
  local l=$((1 + RANDOM % 2)) t0
  log "fault link-cut $l"
  link_cut "$l"
  sleep "$(pick 3 8)"
  link_restore "$l"
  t0=$(now)
  recovered link-cut "$t0"
}

server
: >"$W/faults"
${CLIENT_IN[@]+"${CLIENT_IN[@]}"} "$BIN/rtrs-perf" client --connect "$ADDRS" --rnbd-device d0 --rw randrw \
  --verify --bs 4k --iodepth $QD --cores 0 --poll-sched idle --runtime $((SECS + 3600)) \
  --ramp-time 0 --reconnect-delay 1 --connect-timeout 2 "${HB[@]}" --ctl "$W/clt.sock" \
  --ready "$W/ready" --json >"$W/clt.json" 2>"$W/clt.log" &
CLT_PID=$!
wait_ready "$W/ready" "$CLT_PID" 60 || { tail -20 "$W/clt.log" >&2; exit 1; }
python3 scripts/soak-sample.py "$W/clt.sock" "$W/samples" &
SAMPLER_PID=$!
step "soak: $FAB, $SECS s of verified randrw over 2 paths, faults every $GAP_MIN-$GAP_MAX s (${FAULTS[*]})"
T_START=$(now)
END=$((SECONDS + SECS))
failed=0
while [ $SECONDS -lt "$END" ]; do
  sleep "$(pick "$GAP_MIN" "$GAP_MAX")"
  [ $SECONDS -lt "$END" ] || break
  kind=${FAULTS[$((RANDOM % ${#FAULTS[@]}))]}
  "fault_${kind//-/_}" || failed=1
  kill -0 "$CLT_PID" 2>/dev/null || { echo "the client exited" >&2; failed=1; break; }
done
T_END=$(now)
stop_pid "$SAMPLER_PID"
SAMPLER_PID=
stop_pid "$CLT_PID"
CLT_PID=
stop_pid "$SRV_PID"
SRV_PID=
python3 - "$W" "$FAB" "$T_START" "$T_END" "$QD" "$failed" <<'EOF' | tee -a "${OUT:-/dev/null}"
import json, statistics, sys
w, fab, t0, t1, qd, failed = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
s = json.loads(open(f"{w}/clt.json").read().strip().splitlines()[-1])
faults, rec, unrec = {}, {}, []
for line in open(f"{w}/faults"):
    p = line.split()
    if p[1] == "fault":
        faults[p[2]] = faults.get(p[2], 0) + 1
    elif p[1] == "recovered":
        rec.setdefault(p[2], []).append(float(p[3]))
    elif p[1] == "unrecovered":
        unrec.append(p[2])
samples = []
for line in open(f"{w}/samples"):
    t, ios, errs, up = line.split()
    if int(ios) >= 0:
        samples.append((float(t), int(ios), int(up)))
print(f"== soak {fab}: {t1 - t0:.0f} s of verified randrw (4 KiB, QD {qd}) over 2 paths, {sum(faults.values())} faults")
print("  minute   IOPS (mean)  IOPS (lowest second)  seconds with a path down")
minute, i = 0, 0
while i < len(samples):
    j = i
    while j < len(samples) and samples[j][0] < samples[i][0] + 60:
        j += 1
    seg = samples[i:j]
    if len(seg) > 1:
        rates = [(b[1] - a[1]) / max(b[0] - a[0], 1e-3) for a, b in zip(seg, seg[1:])]
        down = sum(1 for x in seg if x[2] < 2)
        print(f"  {minute:6} {statistics.mean(rates):13.0f} {min(rates):21.0f} {down:25}")
    minute += 1
    i = j
print("  fault               count  recovered in s (min / median / max)")
for k in sorted(faults):
    r = sorted(rec.get(k, []))
    fig = f"{r[0]:.2f} / {statistics.median(r):.2f} / {r[-1]:.2f}" if r else "-"
    print(f"  {k:19} {faults[k]:5}  {fig}")
errs = s["errors_by_errno"]
kills = faults.get("server-restart", 0)
print(f"  ios={s['ios']} mean IOPS={s['iops']:.0f} errors={s['errors']} {errs} verify={s['verify_failures']} "
      f"twice={s['duplicates']} lost={s['submitted'] - s['completed']} failovers={s['failovers']} "
      f"downs={s['path_downs']} reconnects={s['reconnects']} stalled={s['stalled_secs']:.2f}s")
fails = []
if failed:
    fails.append("a fault was not recovered or the client exited")
if unrec:
    fails.append(f"not recovered: {unrec}")
if s["verify_failures"]:
    fails.append(f"{s['verify_failures']} blocks read back wrong")
if s["duplicates"]:
    fails.append(f"{s['duplicates']} IOs completed twice")
if s["submitted"] != s["completed"]:
    fails.append(f"{s['submitted'] - s['completed']} IOs lost")
if any(int(k) != -103 for k in errs):
    fails.append(f"errors other than -ECONNABORTED: {errs}")
if sum(errs.values()) > kills * qd:
    fails.append(f"{sum(errs.values())} IOs failed, more than the {kills} x {qd} in flight at the server kills")
if fails:
    print(f"soak {fab}: FAIL: " + "; ".join(fails))
    sys.exit(1)
print(f"soak {fab}: ok")
EOF
