#!/usr/bin/env bash
# The host's side of a fault case (scripts/vm-faults.sh runs it as scripts/vm2.sh's
# HOST_CMD): watches the guests' samples in the shared directory and drives the
# timeline: IO for FAULT_PRE s, link 1 cut, wait until the client sees path 1
# dead, FAULT_HOLD s more, link 1 restored, wait until path 1 is connected and
# carries IO again, FAULT_POST s, stop. Each sample is stamped with the host
# time it was seen, so scripts/fault-timeline.py can put the guests' events on
# the host's clock. Exit status 0 when the timeline ran to the end (pass/fail
# of the case is the timeline's verdict).
#
#   scripts/vm2-host-fault.sh CASE       (env from scripts/vm2.sh: VM2_CTL, VM2_LINK1, VM2_PIDS)
#   env: FAULT_BIN (the rdma-built rtrs and rtrs-perf), FAULT_SIZE_MB (128), FAULT_PORT (1234)
#   env: FAULT_PRE (10), FAULT_HOLD (10), FAULT_DETECT_MAX (75), FAULT_RECONNECT_MAX (110),
#        FAULT_POST (6), FAULT_SETUP_MAX (300: boots, modules, map, first IO)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/vm-lib.sh
source scripts/vm-lib.sh
CASE=${1:?case}
CTL=${VM2_CTL:?run by scripts/vm2.sh}
EV=$CTL/host.events
# The guests wait for their parameters.
cat > "$CTL/params.tmp" <<PARAMS
CASE=$CASE
TOPO=${VM2_TOPO:-two-links}
BIN=${FAULT_BIN:-$PWD/target/release}
SIZE_MB=${FAULT_SIZE_MB:-128}
PORT=${FAULT_PORT:-1234}
ARP=${FAULT_ARP:-static}
PARAMS
mv "$CTL/params.tmp" "$CTL/params"
: > "$CTL/a.seen"
: > "$CTL/b.seen"

now_ms() { local t=$EPOCHREALTIME; echo $((${t/./} / 1000)); }
event() { # NAME [TEXT] -> the host's own events, on its clock
  local t
  t=$(now_ms)
  echo "$t $*" >> "$EV"
  echo "[host $(date +%T)] $*"
}
declare -A A=() B=()
apart=
bpart=
pull() { # new complete sample lines of a and b -> A[...], B[...] and <vm>.seen
  local l t
  t=$(now_ms)
  while IFS= read -r l <&3 || { apart+=$l; false; }; do
    l=$apart$l apart=
    echo "$t $l" >> "$CTL/a.seen"
    parse A "$l"
  done
  while IFS= read -r l <&4 || { bpart+=$l; false; }; do
    l=$bpart$l bpart=
    echo "$t $l" >> "$CTL/b.seen"
    parse B "$l"
  done
}
parse() { # ARRAY "S t=... k=v ..." -> ARRAY[k]=v, ARRAY[n]++ (lines seen)
  local -n arr=$1
  local kv
  [[ $2 == "S "* ]] || return 0
  for kv in ${2#S }; do arr[${kv%%=*}]=${kv#*=}; done
  arr["n"]=$((${arr["n"]:-0} + 1))
}
alive() { # both guests still running their script
  local p
  for p in $VM2_PIDS; do kill -0 "$p" 2>/dev/null || return 1; done
  [ ! -e "$CTL/a.exit" ] && [ ! -e "$CTL/b.exit" ]
}
# p1ios as far as anyone counts it: the kernel client's (a), else the kernel server's (b).
p1ios() { echo "${A[p1ios]:-${B[p1ios]:-0}}"; }
holds() { # WHAT -> whether it holds now, by the samples pulled so far
  case $1 in
    never) return 1 ;;
    io-flowing) [ "${A[ios]:-0}" -gt 0 ] && [ "${A[p1]:-}" = up ] && [ "${A[p2]:-}" = up ] ;;
    p1-down) [ "${A[n]:-0}" -gt "$n_at_cut" ] && [ "${A[p1]:-}" = down ] ;;
    p1-up) [ "${A[n]:-0}" -gt "$n_at_restore" ] && [ "${A[p1]:-}" = up ] ;;
    p1-carries) [ "$(p1ios)" -gt "$p1ios_at_up" ] ;;
  esac
}
watch_until() { # SECONDS WHAT -> 0 once WHAT holds, 1 at the deadline or a guest's end
  local end=$(($(now_ms) + $1 * 1000))
  while [ "$(now_ms)" -lt $end ]; do
    pull
    holds "$2" && return 0
    if ! alive; then
      [ -n "${ended:-}" ] || event guest-ended "a guest's script ended (or its VM): the timeline stops here"
      ended=1
      return 1
    fi
    sleep 0.2
  done
  return 1
}

touch "$CTL/a.samples" "$CTL/b.samples"
exec 3< "$CTL/a.samples" 4< "$CTL/b.samples"
rc=0
event start "case $CASE"
if ! watch_until "${FAULT_SETUP_MAX:-300}" io-flowing; then
  event abort "no IO on both paths (setup failed)"
  for t in $VM2_LINK1 $VM2_LINK2; do ip -s link show "$t"; done
  bridge fdb show | grep -E "${VM2_LINK1%%[ab]1*}" || true
  rc=1
else
  event io "IO flowing on both paths"
  watch_until "${FAULT_PRE:-10}" never || true
  n_at_cut=${A[n]}
  vm2_link_cut 1
  if [ "${VM2_TOPO:-two-links}" = two-links ]; then
    event cut "link 1 cut: tbf black hole on $VM2_LINK1"
  else
    event cut "path 1 cut: 10.1.0.0/24 into a tbf black hole on $VM2_LINK1 (the shared link)"
  fi
  if watch_until "${FAULT_DETECT_MAX:-75}" p1-down; then
    event seen-dead "the client's path 1 is down"
    echo "path 1 seen dead" > "$CTL/diag-1" # the guests note their threads, stats
    watch_until "${FAULT_HOLD:-10}" never || true
  else
    event no-detect "path 1 still up ${FAULT_DETECT_MAX:-75} s after the cut"
  fi
  n_at_restore=${A[n]}
  vm2_link_restore 1
  event restore "link 1 restored (black hole removed)"
  if watch_until "${FAULT_RECONNECT_MAX:-110}" p1-up; then
    p1ios_at_up=$(p1ios)
    event seen-up "the client's path 1 is up"
    if watch_until 20 p1-carries; then
      event seen-io "path 1 carries IO"
    else
      event no-io "path 1 up but carries no IO"
    fi
  else
    event no-reconnect "path 1 not up ${FAULT_RECONNECT_MAX:-110} s after the restore"
  fi
  watch_until "${FAULT_POST:-6}" never || true
fi
echo "before the stop" > "$CTL/diag-2"
# The taps' packet and drop counts: packets the host's bridges lost.
for t in $VM2_LINK1 $VM2_LINK2; do
  echo "== $t: $(ip -s link show "$t" 2>/dev/null | tr -s ' \n' ' ')"
done | awk '!seen[$0]++' > "$CTL/host.links"
watch_until 2 never || true
event stop "IO stopped"
touch "$CTL/stop"
# The client stops its IO, unmaps and reports; then the server goes.
for _ in $(seq 1500); do
  [ -e "$CTL/a.done" ] || [ -e "$CTL/a.exit" ] || ! alive && break
  sleep 0.1
done
pull
touch "$CTL/halt"
[ -e "$CTL/a.result" ] || event no-result "the client wrote no result"
exit $rc
