#!/usr/bin/env bash
# shellcheck disable=SC2317 # cleanup runs through the trap
# Crowd figures: what a session costs to set up and to keep. For sessions of
# 2 paths with 2, 65 and 129 connections a path (cid 0 and 1, 64 or 128 IO
# connections, all on one client core: the kernel's client makes
# nr_cpus + 1), and for 64 sessions of 2 paths at once, against `rtrs serve`
# with one poll core and with two (--cores 0 / 0,1), over tcp and shm:
#   setup     the client's open of every session until every path is up, and
#             its RNBD device open (ms: all of them, and one session's p50)
#   memory    the server's and the client's VmRSS with the sessions up less
#             before (a census: `rtrs ctl stats`, the client's JSON), per
#             session, and the chunk memory the server holds for a session
#             (queue depth x chunk size) and the client's registered memory
# Each case is a fresh server; verified IO runs for a second once every
# session is up. Prints one table; not in the test command (about 1.5 min).
#
#   scripts/crowd.sh [tcp] [shm]      default: both
#   env: CROWD_QD (the server's queue depth, 128: 64 sessions of 512 chunks
#        would need more registrations than one host's share), CROWD_OUT
#        (a file the table is appended to), CROWD_BIN (no build)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

FABRICS=("$@")
[ ${#FABRICS[@]} -gt 0 ] || FABRICS=(tcp shm)
QD=${CROWD_QD:-128}
OUT=${CROWD_OUT:-}
BIN=$(bin_dir "${CROWD_BIN:-}")
need_tools jq python3
WORK=$(mktemp -d /tmp/rtrs-crowd.XXXXXX)
SRV_PID=
CLT_PID=

cleanup() {
  stop_pid "$CLT_PID"
  stop_pid "$SRV_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

EXPORTS=()
for ((i = 0; i < 64; i++)); do EXPORTS+=(--export "d$i=ram:4M"); done

# One case: the server on CORES, SESSIONS sessions of CONNS connections a
# path; a line of figures (JSON) to $WORK/rows.
case_crowd() { # fabric cores sessions conns
  local fab=$1 cores=$2 n=$3 conns=$4 addrs w
  w=$WORK/$fab-$cores-$n-$conns
  mkdir -p "$w"
  case $fab in
    tcp) addrs=tcp:127.0.0.1:$(free_port),tcp:127.0.0.1:$(free_port) ;;
    shm) addrs=shm:rtrs-crowd-$$-$n-$conns-a,shm:rtrs-crowd-$$-$n-$conns-b ;;
    *) echo "crowd.sh: no fabric $fab (tcp, shm)" >&2; return 2 ;;
  esac
  # No chunk pool: every session's chunk memory is its own (and counted).
  serve_start "$BIN" "$w/srv.sock" "$w/srv.log" --listen "$addrs" --cores "$cores" \
    --poll-sched idle --queue-depth "$QD" --prealloc-sessions 0 --max-sessions-per-host 80 \
    "${EXPORTS[@]}" || return 1
  census_json "$BIN" "$w/srv.sock" >"$w/srv0.json"
  "$BIN/rtrs-perf" client --connect "$addrs" --sessions "$n" --connections "$conns" \
    --rnbd-device 'd{}' --rw randrw --verify --bs 4k --iodepth 4 --cores 0 --poll-sched idle \
    --runtime 1 --ramp-time 0 --connect-timeout 30 --ready "$w/ready" --json \
    >"$w/clt.json" 2>"$w/clt.log" &
  CLT_PID=$!
  wait_ready "$w/ready" "$CLT_PID" 120 || { tail -20 "$w/clt.log" >&2; return 1; }
  census_json "$BIN" "$w/srv.sock" >"$w/srv1.json"
  local rc=0
  wait "$CLT_PID" || rc=$?
  CLT_PID=
  stop_pid "$SRV_PID"
  SRV_PID=
  [ $rc = 0 ] || { tail -20 "$w/clt.log" >&2; return 1; }
  python3 - "$fab" "$cores" "$n" "$conns" "$w" >>"$WORK/rows" <<'EOF'
import json, sys
fab, cores, n, conns, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
last = lambda p: json.loads(open(p).read().strip().splitlines()[-1])
s0, s1, c = last(f"{w}/srv0.json"), last(f"{w}/srv1.json"), last(f"{w}/clt.json")
opens = sorted(x["open_ms"] + (x.get("rnbd_open_ms") or 0) for x in c["sessions"])
print(json.dumps({
    "fabric": fab, "server_cores": cores, "sessions": n, "conns": conns,
    "setup_ms": c["setup_ms"], "open_ms_p50": opens[len(opens) // 2], "open_ms_max": opens[-1],
    "srv_rss_kb": (s1["vm_rss_kb"] - s0["vm_rss_kb"]) / n,
    "clt_rss_kb": (c["census"]["up"]["vm_rss_kb"] - c["census"]["start"]["vm_rss_kb"]) / n,
    "srv_fds": (s1["fds"] - s0["fds"]) / n,
    "chunk_kb": s1["chunk_memory"] / n / 1024,
    "clt_mem_kb": c["sessions"][0]["memory_bytes"] / 1024,
    "ios": c["ios"], "errors": c["errors"], "sessions_up": s1["sessions"],
}))
EOF
}

step "crowds: sessions of 2, 65 and 129 connections a path, and 64 sessions, on 1 and 2 server cores"
failed=0
for f in "${FABRICS[@]}"; do
  for cores in 0 0,1; do
    for shape in "1 2" "1 65" "1 129" "64 2"; do
      t0=$SECONDS
      # shellcheck disable=SC2086 # two words: sessions, connections
      case_crowd "$f" "$cores" $shape >"$WORK/case.out" 2>&1 || {
        failed=1
        echo "crowd $f cores $cores sessions/conns $shape: FAIL"
        cat "$WORK/case.out"
      }
      echo "crowd $f cores $cores sessions/conns $shape: $((SECONDS - t0)) s"
    done
  done
done
[ -e "$WORK/rows" ] || exit 1
python3 - "$WORK/rows" "$QD" <<'EOF' | tee -a "${OUT:-/dev/null}"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"== crowds (queue depth {sys.argv[2]}, chunks of 128 KiB; memory per session; setup: every session "
      f"open with every path up and its RNBD device)")
print(f"  {'fabric':6} {'srv cores':9} {'sessions':>8} {'conns/path':>10} {'setup ms':>9} {'open p50/max ms':>16} "
      f"{'srv RSS KiB':>11} {'clt RSS KiB':>11} {'srv fds':>7} {'chunks KiB':>10} {'clt mem KiB':>11} {'IO':>7}")
for r in rows:
    cores = "1" if r["server_cores"] == "0" else "2"
    print(f"  {r['fabric']:6} {cores:9} {r['sessions']:8} {r['conns']:10} {r['setup_ms']:9.0f} "
          f"{r['open_ms_p50']:8.1f}/{r['open_ms_max']:<7.1f} {r['srv_rss_kb']:11.0f} {r['clt_rss_kb']:11.0f} "
          f"{r['srv_fds']:7.1f} {r['chunk_kb']:10.0f} {r['clt_mem_kb']:11.0f} {r['ios']:7}"
          + ("" if r["errors"] == 0 and r["sessions_up"] == r["sessions"] else "  (!)"))
bad = [r for r in rows if r["errors"] or r["sessions_up"] != r["sessions"]]
if bad:
    print(f"crowds: FAIL: {len(bad)} cases with IO errors or sessions missing")
    sys.exit(1)
EOF
exit $failed
