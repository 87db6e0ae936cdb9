#!/usr/bin/env bash
# Link faults between two hosts, with the kernel as peer: scripts/vm2.sh's two
# VMs, two RTRS paths (one a link), verified IO at QD32 over both; the host
# cuts link 1 silently (a black hole on both taps: no link event), waits until
# the client sees path 1 dead, restores it and waits until path 1 is
# connected and carries IO again. Each case boots its own VM pair and prints
# its timeline on the host's clock (scripts/fault-timeline.py).
#
#   scripts/vm-faults.sh [CASE[@TOPO]...]     default: kernel ours-server ours-client
#     kernel       the kernel's rnbd-client (VM a) -> the kernel's rnbd-server (VM b), fio crc32c
#     ours-server  (or a) the kernel's rnbd-client -> our `rtrs serve`, fio crc32c
#     ours-client  (or b) our `rtrs-perf client --verify` -> the kernel's rnbd-server
#   TOPO (scripts/vm2.sh's VM2_TOPO; default $FAULT_TOPO, else two-links):
#     two-links    a link per path, a soft-RoCE device per link (rxe0, rxe1)
#     one-link     one link and one device carry both paths (two subnets); the
#                  cut black-holes path 1's subnet only. For our engine, whose
#                  rdma backend drives one RDMA device per process.
#
# Results: the "FAULT" lines on stdout and in $VM_FAULTS_OUT/results.txt (default
# target/vm-faults); each case's log in $VM_FAULTS_OUT/<case>.log and its run
# directory (samples, consoles, kernel logs, the tools' logs) in $VM_FAULTS_OUT/<case>/.
# Timeline knobs: see scripts/vm2-host-fault.sh. FAULT_BIN: the directory of
# rtrs and rtrs-perf built with --features rdma (default: build them into
# target/release). FAULT_XFAIL lists cases
# (CASE or CASE@TOPO) whose failure is known: reported, but not counted.
# Exit status: 0 when every case passed (or failed as FAULT_XFAIL expects),
# 1 when one failed, 77 when the VMs cannot run here (with why).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=scripts/vm-lib.sh
source scripts/vm-lib.sh

cases=()
for arg in "${@:-kernel ours-server ours-client}"; do
  for c in $arg; do
    topo=${FAULT_TOPO:-two-links}
    [[ $c != *@* ]] || topo=${c#*@}
    case ${c%@*} in
      kernel | ours-server | ours-client) c=${c%@*} ;;
      a) c=ours-server ;;
      b) c=ours-client ;;
      *) echo "faults.sh: unknown case $c (kernel, ours-server, ours-client)" >&2; exit 2 ;;
    esac
    case $topo in
      two-links) cases+=("$c") ;;
      one-link) cases+=("$c@$topo") ;;
      *) echo "faults.sh: unknown topology $topo (two-links, one-link)" >&2; exit 2 ;;
    esac
  done
done
need_root "scripts/vm2.sh: qemu, bridges, taps"
# Our binaries: built here, unless FAULT_BIN names a directory that has them.
if [[ " ${cases[*]}" == *" ours-"* ]] && [ -z "${FAULT_BIN:-}" ]; then
  step "building rtrs and rtrs-perf with the rdma backend"
  build_bins
fi
export FAULT_BIN=${FAULT_BIN:-$PWD/target/release}
OUT=${VM_FAULTS_OUT:-target/vm-faults}
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
{
  echo "# scripts/vm-faults.sh ${cases[*]}: $(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# host: $(nproc) cores, $(uname -r); guests: Debian $(cut -d' ' -f1 "${RTRS_VM_CACHE:-/var/cache/rtrs-poll-vm}/kver" 2>/dev/null || echo '?'), 1 vCPU each, TCG, soft-RoCE"
} > "$RESULTS"

failed=()
t_all=$SECONDS
for c in "${cases[@]}"; do
  step "fault case $c: path 1's link cut and restored under verified IO"
  topo=two-links
  [[ $c != *@* ]] || topo=${c#*@}
  rm -rf "${OUT:?}/$c"
  t0=$SECONDS
  set +e
  VM2_TOPO=$topo VM2_KEEP=$OUT/$c VM2_QUIET=1 VM_TIMEOUT=${FAULT_CASE_TIMEOUT:-600} VM2_GRACE=90 \
    scripts/vm2.sh scripts/vm2-guest-fault.sh scripts/vm2-host-fault.sh "${c%@*}" 2>&1 |
    tee "$OUT/$c.log" | grep --line-buffered -E '^(\[host|== |vm2.sh)'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 77 ]; then
    skip "scripts/vm2.sh cannot run here (its reason above)"
  fi
  echo "vm2.sh rc=$rc" >> "$OUT/$c.log"
  if python3 scripts/fault-timeline.py "$OUT/$c/ctl" "${c%@*}" $((SECONDS - t0)) "$c" | tee -a "$RESULTS"; then
    [[ " ${FAULT_XFAIL:-} " != *" $c "* ]] || echo "FAULT $c passed though FAULT_XFAIL expects it to fail" | tee -a "$RESULTS"
  else
    if [[ " ${FAULT_XFAIL:-} " == *" $c "* ]]; then
      echo "FAULT $c failed as expected (FAULT_XFAIL)" | tee -a "$RESULTS"
    else
      failed+=("$c")
    fi
    for v in a b; do
      echo "--- the end of VM $v's console ($OUT/$c/$v.console):"
      [ ! -f "$OUT/$c/$v.console" ] || vm_console_filter < "$OUT/$c/$v.console" | tail -25
    done
    for f in "$OUT/$c"/ctl/*.diag; do
      [ ! -f "$f" ] || { echo "--- $f:"; cat "$f"; }
    done
  fi
done
echo "# all cases: $((SECONDS - t_all)) s" | tee -a "$RESULTS"
if [ ${#failed[@]} -gt 0 ]; then
  echo "faults.sh: failed: ${failed[*]} (results: $RESULTS; logs: $OUT/)"
  exit 1
fi
echo "faults.sh: all passed (results: $RESULTS)"
