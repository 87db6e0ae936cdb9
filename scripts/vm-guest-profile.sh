# Guest script (run by scripts/vm.sh; see scripts/profile-server.sh): the
# kernel's rnbd-client against our server (rtrs serve, RAM export) over
# soft-RoCE, fio 4 KiB random IO, with `perf record -a -g` over each run;
# prints fio's line and the hottest symbols (whole guest, both vCPUs).
#   env: BIN (rdma-built rtrs), SECS, OUT (a host directory for perf data,
#        optional), CASES ("randread:1 randwrite:1 ..."), AI (on|off)
set -uo pipefail
BIN=${BIN:?}
SECS=${SECS:-5}
CASES=${CASES:-randread:1 randwrite:1 randread:32 randwrite:32}
AI=${AI:-on}
IP=10.0.2.15
rdma link add rxe0 type rxe netdev eth0 || { echo "no soft-RoCE"; exit 1; }
for m in rtrs/rtrs-core rtrs/rtrs-server rtrs/rtrs-client; do insmod "$RTRS_KMODS/$m.ko"; done
insmod "$RTRS_KMODS/rnbd/rnbd-client.ko"
"$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M \
  --always-invalidate "$AI" > /run/serve.log 2>&1 &
srv=$!
for _ in $(seq 600); do grep -q "listening on" /run/serve.log && break; sleep 0.1; done
echo "sessname=prof dest_port=1235 path=ip:$IP device_path=ram0" > /sys/devices/virtual/rnbd-client/ctl/map_device
dev=
for _ in $(seq 100); do
  for d in /sys/block/rnbd*; do [ -e "$d/rnbd/session" ] && dev=/dev/${d##*/}; done
  [ -n "$dev" ] && break; sleep 0.1
done
[ -n "$dev" ] || { echo "no device"; cat /run/serve.log; exit 1; }
for c in $CASES; do
  rw=${c%:*} qd=${c#*:}
  perf record -q -a -g -o /run/perf.data -- fio --name=p --filename="$dev" --direct=1 --rw="$rw" \
    --bs=4k --iodepth="$qd" --ioengine=libaio --runtime="$SECS" --time_based --size=32M \
    --group_reporting > /run/fio.log 2>&1
  echo "=== $rw QD$qd: $(grep -E 'IOPS=' /run/fio.log | head -1)"
  perf report -q -i /run/perf.data --no-children --sort comm,dso,sym --percent-limit 0.7 -g none 2>/dev/null | head -45
  [ -n "${OUT:-}" ] && cp /run/perf.data "$OUT/perf-$rw-$qd.data" 2>/dev/null
done
echo normal > "/sys/block/${dev##*/}/rnbd/unmap_device"
kill -INT $srv; wait $srv
exit 0
