#!/usr/bin/env bash
# File backends beside local fio, in one run (issue 11, docs/PERF.md "File and
# block backends"): for a file on tmpfs and one on a disk file system,
#   1. fio (ioengine=io_uring, direct=1 where the file system takes it,
#      pinned to cpu 1) on the file: 4 KiB randread and randwrite, QD 1 and 32;
#   2. then `rtrs serve` (cpu 0) exporting the same files over shm and
#      `rtrs-perf client --rnbd-device` (cpu 1): the same patterns.
# fio and our pair never run at the same time; a RAM export gives the engine's
# own floor in the same run. Prints a markdown table:
# IOPS, p50 and p99 latency (fio: submission to completion, lat_percentiles),
# and ours/fio for the p50.
#
#   scripts/backend-bench.sh [SECONDS] [SIZE]      (root: hugepages; defaults 5 256M)
#   TMPFS_DIR=/dev/shm DISK_DIR=/var/tmp NO_BUILD=1 scripts/backend-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages fio
SECS=${1:-5}
SIZE=${2:-256M}
TMPFS_DIR=${TMPFS_DIR:-/dev/shm}
DISK_DIR=${DISK_DIR:-/var/tmp}
reserve_hugepages 512
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p rtrs-cli -p rtrs-perf
RTRS=target/release/rtrs
PERF=target/release/rtrs-perf
TAG=rtrs-backend-bench-$$
TMPFS_FILE=$TMPFS_DIR/$TAG.img
DISK_FILE=$DISK_DIR/$TAG.img
OUT=$(mktemp -d /tmp/$TAG.XXXXXX)
SRV=
cleanup() {
  stop_pid "$SRV"
  rm -f "$TMPFS_FILE" "$DISK_FILE"
  rm -rf "$OUT"
}
trap cleanup EXIT INT TERM

step "files: $SIZE on $TMPFS_DIR ($(stat -f -c %T "$TMPFS_DIR")) and $DISK_DIR ($(stat -f -c %T "$DISK_DIR"))"
for f in "$TMPFS_FILE" "$DISK_FILE"; do
  # Written out (not sparse): reads find real blocks.
  fio --name=fill --filename="$f" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --end_fsync=1 --output=/dev/null
done

# O_DIRECT where the file system takes it (fio's direct=1), else buffered.
direct_for() { # FILE -> 1|0
  if python3 -c "import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT))" "$1" 2>/dev/null; then
    echo 1
  else
    echo 0
  fi
}

PATTERNS=(randread:1 randread:32 randwrite:1 randwrite:32)

step "fio (io_uring, cpu 1), ${SECS}s each"
for fs in tmpfs disk; do
  f=$TMPFS_FILE
  [ "$fs" = disk ] && f=$DISK_FILE
  d=$(direct_for "$f")
  for p in "${PATTERNS[@]}"; do
    set -- "${p%:*}" "${p#*:}"
    fio --name=b --filename="$f" --ioengine=io_uring --direct="$d" --rw="$1" --bs=4k \
      --iodepth="$2" --cpus_allowed=1 --time_based --runtime="$SECS" --size="$SIZE" \
      --lat_percentiles=1 --randrepeat=0 --output-format=json --output="$OUT/fio-$fs-$1-$2.json"
    echo "  $fs $1 QD$2 done"
  done
done

step "rtrs serve (cpu 0) + rtrs-perf client --rnbd-device (cpu 1) over shm, ${SECS}s each"
ADDR=shm:$TAG
# The poller is pinned to cpu 0 by --cores; the process is not, so the
# io_uring workers may run beside the client (a 2-CPU machine has no
# housekeeping CPU for them).
"$RTRS" serve --listen "$ADDR" --cores 0 \
  --export "tmpfs=file:$TMPFS_FILE" --export "disk=file:$DISK_FILE" --export "ram=ram:$SIZE" \
  >"$OUT/serve.log" 2>&1 &
SRV=$!
for _ in $(seq 100); do grep -qs "listening on" "$OUT/serve.log" && break; sleep 0.1; done
grep "^export" "$OUT/serve.log" | sed 's/^/  /'
# ram: the engine's floor (a RAM export, no file), in the same run.
for fs in ram tmpfs disk; do
  for p in "${PATTERNS[@]}"; do
    set -- "${p%:*}" "${p#*:}"
    taskset -c 1 "$PERF" client --connect "$ADDR" --rnbd-device "$fs" --rw "$1" --bs 4k \
      --iodepth "$2" --cores 1 --runtime "$SECS" --size "$SIZE" --json \
      >"$OUT/rtrs-$fs-$1-$2.json" 2>>"$OUT/client.log"
    echo "  $fs $1 QD$2 done"
  done
done
stop_pid "$SRV"
SRV=
grep "rnbd backend" "$OUT/serve.log" | sed 's/^/  /' || true

step "table"
python3 - "$OUT" "$SECS" "$SIZE" <<'EOF'
import json, sys
out, secs, size = sys.argv[1:4]
print(f"4 KiB IOs, {secs} s each, {size} files; fio local (io_uring) vs rtrs remote over shm (server cpu 0, client cpu 1)\n")
print("| file system | pattern | QD | fio IOPS | fio p50 us | fio p99 us | rtrs IOPS | rtrs p50 us | rtrs p99 us | p50 rtrs/fio |")
print("|---|---|---|---|---|---|---|---|---|---|")
for fs in ("ram", "tmpfs", "disk"):
    for rw, qd in (("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)):
        r = json.load(open(f"{out}/rtrs-{fs}-{rw}-{qd}.json"))
        rp50, rp99 = r["lat_ns"]["p50"] / 1e3, r["lat_ns"]["p99"] / 1e3
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        ours = f"{r['iops']:.0f}{err} | {rp50:.1f} | {rp99:.1f}"
        if fs == "ram":
            print(f"| ram (engine floor) | {rw} | {qd} | - | - | - | {ours} | - |")
            continue
        f = json.load(open(f"{out}/fio-{fs}-{rw}-{qd}.json"))["jobs"][0]
        f = f["read" if rw == "randread" else "write"]
        pct = f["lat_ns"]["percentile"]
        fp50, fp99 = pct["50.000000"] / 1e3, pct["99.000000"] / 1e3
        print(f"| {fs} | {rw} | {qd} | {f['iops']:.0f} | {fp50:.1f} | {fp99:.1f} | "
              f"{ours} | {rp50 / fp50:.2f} |")
EOF
