#!/usr/bin/env bash
# End-to-end RTRS figures beside their peers, in one run (issue 4 §5):
#   shm: rtrs-perf's embedded server + client (cores 1 and 0), 4 KiB writes at
#        QD 1 and QD 32, always_invalidate on and off; beside UCX posix tag_lat
#        4 KiB (a bare messaging round trip, no storage protocol).
#   tcp: rtrs-perf server and client processes over loopback, 4 KiB random
#        writes at QD 1 and QD 32; beside fio + nbdkit (memory plugin) over a
#        unix socket, the same pattern.
#   Heap allocations per IO on the client cores come from rtrs-perf's
#   counting allocator.
# Prints a markdown table.
#
#   scripts/bench-engine.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages ucx-utils fio nbdkit
reserve_hugepages 512
SECS=${1:-5}
cargo build --release -q -p rtrs-perf
PERF=target/release/rtrs-perf
PORT=$((20000 + RANDOM % 20000))
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
kiops() { json '"%.0fk IOPS, p50 %.2f us" % (d["iops"] / 1e3, d["lat_ns"]["p50"] / 1e3)'; }

ucx_4k_rtt_us() {
  PORT=$((PORT + 1))
  UCX_TLS=posix,self taskset -c 1 ucx_perftest -p $PORT >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  UCX_TLS=posix,self taskset -c 0 ucx_perftest 127.0.0.1 -p $PORT -t tag_lat -s 4096 -n 200000 2>/dev/null |
    awk '/^Final:/ {printf "%.2f", $3 * 2}' || true
  wait $srv 2>/dev/null || true
}

fio_nbd() { # IODEPTH -> "Nk IOPS, p50 X us"
  local sock
  sock=$(mktemp -u /tmp/rtrs-bench-nbd.XXXXXX)
  taskset -c 1 nbdkit -f -U "$sock" memory 1G &
  local srv=$!
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  taskset -c 0 fio --name=nbd --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randwrite \
    --bs=4k --iodepth="$1" --runtime="$SECS" --time_based --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | json '"%.0fk IOPS, p50 %.2f us" % (d["jobs"][0]["write"]["iops"] / 1e3, d["jobs"][0]["write"]["clat_ns"]["percentile"]["50.000000"] / 1e3)' ||
    echo "n/a"
  kill $srv 2>/dev/null || true
  wait $srv 2>/dev/null || true
}

ours_tcp() { # IODEPTH -> json line
  PORT=$((PORT + 1))
  $PERF server --listen "tcp:127.0.0.1:$PORT" --backend ram:1G --cores 1 >/dev/null 2>&1 &
  local srv=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  $PERF client --connect "tcp:127.0.0.1:$PORT" --rw randwrite --bs 4k --iodepth "$1" --cores 0 \
    --runtime "$SECS" --json 2>/dev/null || true
  kill -INT $srv 2>/dev/null || true
  wait $srv 2>/dev/null || true
}

echo "| what | rtrs-poll | peer (same run) |"
echo "|---|---|---|"
UCX=$(ucx_4k_rtt_us)
for ai in on off; do
  q1=$($PERF embedded --rw write --iodepth 1 --runtime "$SECS" --always-invalidate $ai --json)
  q32=$($PERF embedded --rw write --iodepth 32 --runtime "$SECS" --always-invalidate $ai --json)
  echo "| shm 4 KiB write QD1, always_invalidate=$ai | $(echo "$q1" | kiops) | UCX posix tag_lat 4 KiB RTT ${UCX:-n/a} us |"
  echo "| shm 4 KiB write QD32, always_invalidate=$ai | $(echo "$q32" | kiops) | - |"
  echo "| heap allocations per IO (client cores, QD32, $ai) | $(echo "$q32" | json 'd.get("allocs_per_io")') | - |"
done
for qd in 1 32; do
  if t=$(ours_tcp $qd) && [ -n "$t" ]; then ours=$(echo "$t" | kiops); else ours="n/a"; fi
  echo "| tcp 4 KiB randwrite QD$qd (ram backend) | $ours | fio + nbdkit (memory, unix socket): $(fio_nbd $qd) |"
done
