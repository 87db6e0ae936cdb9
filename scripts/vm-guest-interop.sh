# Guest script (run by scripts/vm.sh; see scripts/interop.sh): rtrs-poll and
# the kernel's RTRS/RNBD over soft-RoCE, both directions, with verified data,
# then the four client/server pairs side by side.
#   env: BIN (the directory of the rdma-built rtrs and rtrs-perf), SECS
set -uo pipefail
BIN=${BIN:?the directory of rtrs and rtrs-perf built with --features rdma}
SECS=${SECS:-5}
IP=10.0.2.15
fail=0
ok() { echo "INTEROP OK: $*"; }
bad() { echo "INTEROP FAIL: $*"; fail=1; }

rdma link add rxe0 type rxe netdev eth0 || { echo "no soft-RoCE"; exit 1; }
for m in rtrs/rtrs-core rtrs/rtrs-server rtrs/rtrs-client; do insmod "$RTRS_KMODS/$m.ko"; done
insmod "$RTRS_KMODS/rnbd/rnbd-client.ko"
modprobe brd rd_nr=2 rd_size=65536 2>/dev/null || true
[ -b /dev/ram0 ] || { echo "no /dev/ram0"; exit 1; }

fio_on() { # DEV RW QD [extra...] -> fio's IOPS/latency lines
  local dev=$1 rw=$2 qd=$3
  shift 3
  fio --name=i --filename="$dev" --direct=1 --rw="$rw" --bs=4k --iodepth="$qd" --ioengine=libaio \
    --runtime="$SECS" --time_based --size=32M --verify_state_save=0 --group_reporting "$@" 2>&1 |
    grep -E "IOPS=|clat \(|err=|verify" | head -4
}

map() { # SESSNAME DEVICE PORT -> /dev/rnbdN
  # dest_port must come before path= (the kernel converts each path at once).
  echo "sessname=$1 dest_port=$3 path=ip:$IP device_path=$2" > /sys/devices/virtual/rnbd-client/ctl/map_device || return 1
  for _ in $(seq 100); do
    for d in /sys/block/rnbd*; do
      [ -e "$d/rnbd/session" ] && [ "$(cat "$d/rnbd/session")" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    sleep 0.1
  done
  return 1
}

unmap() { echo normal > "/sys/block/${1##*/}/rnbd/unmap_device"; }

serving() { # LOG -> waits until rtrs serve listens (RAM exports fault in first)
  for _ in $(seq 600); do
    grep -q "listening on" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "rtrs serve did not start:"; cat "$1"
  return 1
}

# --- 1. our client -> the kernel's rtrs-server + rnbd-server (/dev/ram0), both always_invalidate
for ai in Y N; do
  rmmod rnbd-server 2>/dev/null; rmmod rtrs-server 2>/dev/null
  insmod "$RTRS_KMODS/rtrs/rtrs-server.ko" always_invalidate=$ai
  insmod "$RTRS_KMODS/rnbd/rnbd-server.ko"
  if "$BIN/rtrs-perf" client --connect "rdma:$IP:1234" --rnbd-device /dev/ram0 --verify --rw randrw \
    --bs 4k --iodepth 8 --runtime 3 --size 32M --cores 0 --json > /run/ours-kernel.json; then
    errs=$(python3 -c 'import json; print(json.load(open("/run/ours-kernel.json"))["errors"])')
    iops=$(python3 -c 'import json; d=json.load(open("/run/ours-kernel.json")); print("%d ios, %.0f IOPS, p50 %d us" % (d["ios"], d["iops"], d["lat_ns"]["p50"] / 1000))')
    [ "$errs" = 0 ] && ok "our client -> kernel server (always_invalidate=$ai), verified: $iops" ||
      bad "our client -> kernel server (always_invalidate=$ai): $errs errors"
  else
    bad "our client -> kernel server (always_invalidate=$ai) did not run"
  fi
done

# --- 2. the kernel's rnbd-client -> our server (rtrs serve), both always_invalidate;
#        a RAM export and a file export
rmmod rnbd-server 2>/dev/null; rmmod rtrs-server 2>/dev/null
rm -f /run/disk0.img; truncate -s 32M /run/disk0.img
for ai in on off; do
  "$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M \
    --export disk0=file:/run/disk0.img --always-invalidate $ai > /run/serve.log 2>&1 &
  srv=$!
  serving /run/serve.log
  if dev=$(map "ours-$ai" ram0 1235); then
    if fio_on "$dev" randwrite 8 --verify=crc32c --do_verify=1 | tee /run/fio.log | grep -q "err= 0"; then
      ok "kernel client -> our server (always_invalidate=$ai), fio crc32c verified"
    else
      bad "kernel client -> our server (always_invalidate=$ai): fio"; cat /run/fio.log
    fi
    unmap "$dev"
  else
    bad "kernel client -> our server (always_invalidate=$ai): map_device"; cat /run/serve.log
  fi
  if fdev=$(map "file-$ai" disk0 1235); then
    # The size rnbd-server would report, fio's verify, and the bytes in the file itself.
    sz=$(blockdev --getsize64 "$fdev")
    head -c 65536 /dev/urandom > /run/pat
    dd if=/run/pat of="$fdev" bs=4k seek=100 oflag=direct status=none
    if [ "$sz" = 33554432 ] &&
      [ "$(md5sum < /run/pat)" = "$(dd if=/run/disk0.img bs=4k skip=100 count=16 status=none | md5sum)" ] &&
      fio_on "$fdev" randrw 8 --verify=crc32c --do_verify=1 | tee /run/fio.log | grep -q "err= 0"; then
      ok "kernel client -> our file export (always_invalidate=$ai): size $sz, data in the file, fio crc32c verified"
    else
      bad "kernel client -> our file export (always_invalidate=$ai): size $sz"; cat /run/fio.log
    fi
    unmap "$fdev"
  else
    bad "kernel client -> our file export (always_invalidate=$ai): map_device"; cat /run/serve.log
  fi
  kill -INT $srv; wait $srv
done
rm -f /run/disk0.img /run/pat

# --- 3. an idle session survives on heartbeats (> 30 s), and the kernel client
#        reconnects after our server restarts
"$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M > /run/serve.log 2>&1 &
srv=$!
serving /run/serve.log
if dev=$(map idle ram0 1235); then
  sleep 35
  if fio_on "$dev" randwrite 1 --verify=crc32c --runtime=2 | grep -q "err= 0"; then
    ok "idle session alive after 35 s"
  else
    bad "idle session died"
  fi
  kill -INT $srv; wait $srv
  "$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M > /run/serve2.log 2>&1 &
  srv=$!
  serving /run/serve2.log
  # The kernel client sees the path go down, then reconnects after RNBD's
  # delay (30 s + jitter) and re-opens the device.
  st=$(ls -d /sys/class/rtrs-client/idle/paths/* 2>/dev/null | head -1)/state
  down=0
  for _ in $(seq 900); do
    s=$(cat "$st" 2>/dev/null)
    [ "$s" != connected ] && down=1
    [ $down = 1 ] && [ "$s" = connected ] && break
    sleep 0.1
  done
  echo "path state after restart: $(cat "$st" 2>/dev/null) (went down: $down)"
  sleep 1
  if [ $down = 1 ] && fio_on "$dev" randwrite 1 --verify=crc32c --runtime=2 | grep -q "err= 0"; then
    ok "kernel client reconnected after our server restarted, verified"
  else
    bad "no reconnect after restart"; tail -5 /run/serve2.log
  fi
  unmap "$dev"
  kill -INT $srv; wait $srv
fi
ls /sys/block | grep -q rnbd && bad "an rnbd device is left behind" || ok "nothing left behind"

# --- 4. side by side: 4 KiB random reads and writes, QD 1 and 32
echo "| pair | rw | QD | result |"
echo "|---|---|---|---|"
insmod "$RTRS_KMODS/rtrs/rtrs-server.ko"; insmod "$RTRS_KMODS/rnbd/rnbd-server.ko"
"$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M --export ram1=ram:64M > /run/serve.log 2>&1 &
srv=$!
serving /run/serve.log
# Each pair gets its own device: an RW open excludes other writers.
kdev=$(map kk /dev/ram0 1234) || { bad "map kk"; exit 1; }
odev=$(map ko ram0 1235) || { bad "map ko"; exit 1; }
for rw in randread randwrite; do
  for qd in 1 32; do
    echo "| kernel -> kernel | $rw | $qd | $(fio_on "$kdev" $rw $qd | grep IOPS | head -1) |"
    echo "| kernel -> ours | $rw | $qd | $(fio_on "$odev" $rw $qd | grep IOPS | head -1) |"
    echo "| ours -> kernel | $rw | $qd | $("$BIN/rtrs-perf" client --connect "rdma:$IP:1234" --rnbd-device /dev/ram1 --rw $rw --bs 4k --iodepth $qd --runtime "$SECS" --size 32M 2>&1 | grep -E "IOPS=|rtrs-perf:" | head -1) |"
    echo "| ours -> ours | $rw | $qd | $("$BIN/rtrs-perf" client --connect "rdma:$IP:1235" --rnbd-device ram1 --rw $rw --bs 4k --iodepth $qd --runtime "$SECS" --size 32M 2>&1 | grep -E "IOPS=|rtrs-perf:" | head -1) |"
  done
done
unmap "$kdev"; unmap "$odev"
kill -INT $srv; wait $srv
exit $fail
