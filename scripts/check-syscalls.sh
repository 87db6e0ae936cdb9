#!/usr/bin/env bash
# Syscalls per IO on the data cores (issue 12), on the host over shm: the
# embedded server and client of rtrs-perf (server core 1, client core 0),
# 4 KiB randread and randwrite at QD1, always_invalidate on and off. perf's
# raw_syscalls tracepoint counts each core thread's system calls over SECS
# in the middle of the run; its IOs in that window come from the run's rate.
# The data path makes none over shm: fails above 0.01 per IO (the rdma
# figures, one post per IO, are checked in the VM by scripts/interop.sh).
#
#   scripts/check-syscalls.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages linux-perf
SECS=${1:-2}
build_bins
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
if ! perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  skip "perf cannot count syscalls here (tracefs, perf_event_paranoid)"
fi
out=$(mktemp -d /tmp/rtrs-syscalls.XXXXXX)
pid=
trap '[ -n "$pid" ] && stop_pid "$pid"; rm -rf "$out"' EXIT
tid_of() { # PID NAME -> the tid of its thread NAME
  for t in /proc/$1/task/*; do [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] && { echo "${t##*/}"; return; }; done
  return 0
}
fail=0
echo "| data core | rw | always_invalidate | syscalls | IOs | per IO |"
echo "|---|---|---|---:|---:|---:|"
for ai in on off; do
  for rw in randread randwrite; do
    target/release/rtrs-perf embedded --rw $rw --bs 4k --iodepth 1 --runtime $((SECS + 2)) \
      --always-invalidate $ai --json > "$out/run.json" 2> "$out/run.err" &
    pid=$!
    srv= clt= ctl=
    for _ in $(seq 200); do
      srv=$(tid_of $pid rtrs-core0) clt=$(tid_of $pid rtrs-clt0) ctl=$(tid_of $pid rtrs-srv-ctl)
      [ -n "$srv" ] && [ -n "$clt" ] && [ -n "$ctl" ] && break
      sleep 0.02
    done
    sleep 0.5
    perf stat -x, -e raw_syscalls:sys_enter -t "$srv" -o "$out/srv" -- sleep "$SECS" &
    ps=$!
    # The server's control thread waits in poll(2): the counter's witness.
    perf stat -x, -e raw_syscalls:sys_enter -t "$ctl" -o "$out/ctl" -- sleep "$SECS" &
    pc=$!
    perf stat -x, -e raw_syscalls:sys_enter -t "$clt" -o "$out/clt" -- sleep "$SECS"
    wait $ps $pc
    witness=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$out/ctl")
    if ! [ "${witness:-0}" -gt 0 ] 2>/dev/null; then
      echo "check-syscalls: FAIL: the control thread's count is '${witness:-}': the counter does not count"
      fail=1
    fi
    wait $pid
    pid=
    ios=$(python3 -c "import json; print(int(json.load(open('$out/run.json'))['iops'] * $SECS))")
    for who in srv clt; do
      calls=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$out/$who")
      per=$(python3 -c "print('%.4f' % (${calls:-1e9} / max($ios, 1)))")
      echo "| $([ $who = srv ] && echo server || echo client) | $rw | $ai | ${calls:-?} | $ios | $per |"
      if ! python3 -c "import sys; sys.exit(0 if ${calls:-1e9} / max($ios, 1) <= 0.01 else 1)"; then
        echo "check-syscalls: FAIL: the $who core made $per syscalls per IO ($rw, always_invalidate $ai)"
        fail=1
      fi
    done
  done
done
exit $fail
