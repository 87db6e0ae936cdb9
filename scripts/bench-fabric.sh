#!/usr/bin/env bash
# Fabric benchmarks beside their peers, in one run (issue: fabric-lat/bw vs UCX):
#   the hardware floor, rtrs-perf fabric-lat/fabric-bw, and UCX's ucx_perftest
#   over the same medium (posix shared memory; tcp over loopback), both ends
#   pinned to cores 0 and 1. Prints a markdown table.
#
#   scripts/bench-fabric.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages ucx-utils
ITERS=${1:-100000}
cargo build --release -q -p rtrs-perf
PERF=target/release/rtrs-perf
PORT=$((20000 + RANDOM % 20000))

# ucx_perftest prints one-way latency (half the round trip) in us; we report RTT in ns.
ucx() { # TLS TEST SIZE -> the "Final:" line
  local tls=$1 test=$2 size=$3
  PORT=$((PORT + 1))
  UCX_TLS=$tls,self taskset -c 1 ucx_perftest -p $PORT >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  UCX_TLS=$tls,self taskset -c 0 ucx_perftest 127.0.0.1 -p $PORT -t "$test" -s "$size" -n "$ITERS" 2>/dev/null | grep '^Final:' || true
  wait $srv 2>/dev/null || true
}
ucx_rtt_ns() { ucx "$@" | awk '{printf "%d", $3 * 2000}'; }
ucx_rate() { ucx "$@" | awk '{printf "%.2f", $8 / 1e6}'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "| what | size | rtrs-poll | peer (same run) |"
echo "|---|---|---|---|"
$PERF floor --json --iters "$ITERS" | json '"| floor: cache-line ping-pong RTT p50 | 64 B | %d ns | - |" % d["line_rtt_ns"]["p50"]'
$PERF floor --json --iters "$ITERS" | json '"| floor: 4 KiB moved as fabric-lat does, RTT p50 | 4096 B | %d ns | - |" % d["copy_rtt_ns"]["p50"]'
for fabric in shm tcp; do
  tls=$([ $fabric = shm ] && echo posix || echo tcp)
  for size in 8 4096; do
    if ours=$($PERF fabric-lat --fabric $fabric --size $size --iters "$ITERS" --json 2>/dev/null); then
      ours=$(echo "$ours" | json 'd["lat_ns"]["p50"]')
    else
      ours="n/a"
    fi
    echo "| $fabric RTT p50 (UCX $tls tag_lat) | $size B | $ours ns | $(ucx_rtt_ns $tls tag_lat $size) ns |"
  done
  if ours=$($PERF fabric-bw --fabric $fabric --size 4096 --iters $((ITERS * 10)) --json 2>/dev/null); then
    ours=$(echo "$ours" | json '"%.2f" % (d["msg_rate"] / 1e6)')
  else
    ours="n/a"
  fi
  echo "| $fabric message rate one way (UCX $tls tag_bw) | 4096 B | $ours M msg/s | $(ucx_rate $tls tag_bw 4096) M msg/s |"
done
