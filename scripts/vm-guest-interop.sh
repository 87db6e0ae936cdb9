# Guest script (run by scripts/vm.sh; see scripts/interop.sh): rtrs-poll and
# the kernel's RTRS/RNBD over soft-RoCE, both directions, with verified data,
# then the four client/server pairs side by side.
#   env: BIN (the directory of the rdma-built rtrs and rtrs-perf), SECS,
#   INTEROP_BREAK_KK (1: the first kernel-pair fio gets no device, to try the retry),
#   INTEROP_FULL (1: every size and our client's syscalls with always_invalidate off too)
set -uo pipefail
BIN=${BIN:?the directory of rtrs and rtrs-perf built with --features rdma}
SECS=${SECS:-5}
IP=10.0.2.15
fail=0
ok() { echo "INTEROP OK: $*"; }
bad() { echo "INTEROP FAIL: $*"; fail=1; }
# Where the guest's time goes (the test command's budget: docs/testing.md).
at() { echo "== interop: $* (at $SECONDS s)"; }

rdma link add rxe0 type rxe netdev eth0 || { echo "no soft-RoCE"; exit 1; }
for m in rtrs/rtrs-core rtrs/rtrs-server rtrs/rtrs-client; do insmod "$RTRS_KMODS/$m.ko"; done
insmod "$RTRS_KMODS/rnbd/rnbd-client.ko"
# The initrd loaded brd with its defaults (16 MiB): again, with the 64 MiB the
# runs' --size 32M needs (modprobe from the guest kernel's own module tree,
# beside the cache's kmods). A plain modprobe was a no-op here, and rtrs-perf
# clamped its 32M to the 16 MiB device without a word until issue 20.
rmmod brd 2>/dev/null
modprobe -d "${RTRS_KMODS%/*}/img" brd rd_nr=2 rd_size=65536 || { echo "brd: modprobe failed"; exit 1; }
for d in ram0 ram1; do
  [ "$(blockdev --getsize64 /dev/$d 2>/dev/null)" = $((64 << 20)) ] || { echo "no 64 MiB /dev/$d"; exit 1; }
done

# fio's count of blocks read (issued rwts: total=<reads>,<writes>) in LOG.
fio_reads() { sed -n 's/.*issued rwts: total=\([0-9]*\),.*/\1/p' "$1" | head -1; }

# Random 4 KiB writes on DEV at QD for SECS (or --runtime=...), each block read
# back and checked (crc32c) 256 writes behind; fio's output in /run/fio.log,
# its main lines printed. True when fio had no error and read blocks back: a
# time-based write job without --verify_backlog reaches its verify phase only
# after a whole pass over --size (8192 blocks, longer than SECS here), so it
# would read nothing.
fio_verified() { # DEV QD [extra...]
  local dev=$1 qd=$2 rc=0 reads
  shift 2
  fio --name=i --filename="$dev" --direct=1 --rw=randwrite --bs=4k --iodepth="$qd" --ioengine=libaio \
    --runtime="$SECS" --time_based --size=32M --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
    --verify_state_save=0 --group_reporting --thread "$@" > /run/fio.log 2>&1 || rc=$?
  grep -E "IOPS=|clat \(|err=|verify|issued rwts" /run/fio.log | head -6
  reads=$(fio_reads /run/fio.log)
  echo "fio rc=$rc: ${reads:-0} blocks read back and checked"
  [ $rc = 0 ] && grep -q "err= 0" /run/fio.log && [ "${reads:-0}" -gt 0 ]
}

# A block corrupted behind the server's back is caught by fio's read-back.
# fio writes 1 MiB at 8 MiB of DEV (256 blocks; a size-based job, so its
# verify phase reads all 256 back), one 4 KiB block of the server's backing
# FILE is overwritten, and fio's --verify_only pass over the same MiB must
# fail at that block's offset (the write pass's own verify phase is the
# control: the same blocks, untouched, read back clean). Two fio starts: seconds.
corrupt_caught() { # DEV FILE
  local dev=$1 file=$2 at=$((8 << 20)) off reads
  off=$((at + 37 * 4096))
  local job=(--name=c --filename="$dev" --direct=1 --rw=write --bs=4k --iodepth=8 --ioengine=libaio
    --offset=$at --size=1M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --thread)
  fio "${job[@]}" > /run/fio-c1.log 2>&1 || { echo "the write pass failed:"; cat /run/fio-c1.log; return 1; }
  reads=$(fio_reads /run/fio-c1.log)
  [ "$reads" = 256 ] || { echo "the write pass read back ${reads:-0} blocks, not 256"; cat /run/fio-c1.log; return 1; }
  dd if=/dev/urandom of="$file" bs=4k seek=$((off / 4096)) count=1 conv=notrunc status=none
  if fio "${job[@]}" --verify_only > /run/fio-c3.log 2>&1; then
    echo "fio's read-back did not see the block corrupted at offset $off:"; cat /run/fio-c3.log; return 1
  fi
  grep -q "offset $off" /run/fio-c3.log || { echo "fio failed, not at offset $off:"; cat /run/fio-c3.log; return 1; }
  grep -E "^verify|err=" /run/fio-c3.log | head -2
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

unmap() { # a device whose session dropped may need force
  echo normal > "/sys/block/${1##*/}/rnbd/unmap_device" 2>/dev/null ||
    echo force > "/sys/block/${1##*/}/rnbd/unmap_device"
}

serving() { # LOG -> waits until rtrs serve listens (RAM exports fault in first)
  for _ in $(seq 600); do
    grep -q "listening on" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "rtrs serve did not start:"; cat "$1"
  return 1
}

at "1. our client -> the kernel's server"
# --- 1. our client -> the kernel's rtrs-server + rnbd-server (/dev/ram0), both always_invalidate
for ai in Y N; do
  rmmod rnbd-server 2>/dev/null; rmmod rtrs-server 2>/dev/null
  insmod "$RTRS_KMODS/rtrs/rtrs-server.ko" always_invalidate=$ai
  insmod "$RTRS_KMODS/rnbd/rnbd-server.ko"
  if "$BIN/rtrs-perf" client --connect "rdma:$IP:1234" --rnbd-device /dev/ram0 --verify --rw randrw \
    --bs 4k --iodepth 8 --runtime 3 --size 32M --cores 0 --json > /run/ours-kernel.json; then
    errs=$(jq .errors /run/ours-kernel.json)
    iops=$(jq -r '"\(.ios) ios, \(.iops | floor) IOPS, p50 \(.lat_ns.p50 / 1000 | floor) us"' /run/ours-kernel.json)
    [ "$errs" = 0 ] && ok "our client -> kernel server (always_invalidate=$ai), verified: $iops" ||
      bad "our client -> kernel server (always_invalidate=$ai): $errs errors"
  else
    bad "our client -> kernel server (always_invalidate=$ai) did not run"
  fi
done

at "2. the kernel's client -> our server"
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
    if fio_verified "$dev" 8; then
      ok "kernel client -> our server (always_invalidate=$ai), fio crc32c verified: $(fio_reads /run/fio.log) blocks read back"
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
      fio_verified "$fdev" 8; then
      ok "kernel client -> our file export (always_invalidate=$ai): size $sz, data in the file, fio crc32c verified: $(fio_reads /run/fio.log) blocks read back"
    else
      bad "kernel client -> our file export (always_invalidate=$ai): size $sz"; cat /run/fio.log
    fi
    if [ "$ai" = on ]; then
      if corrupt_caught "$fdev" /run/disk0.img; then
        ok "kernel client -> our file export: a block corrupted in the file is caught by fio's read-back verify"
      else
        bad "kernel client -> our file export: a corrupted block went unseen"
      fi
    fi
    unmap "$fdev"
  else
    bad "kernel client -> our file export (always_invalidate=$ai): map_device"; cat /run/serve.log
  fi
  kill -INT $srv; wait $srv
done
rm -f /run/disk0.img /run/pat /run/fio-c[13].log

at "3. an idle session, a restart"
# --- 3. an idle session survives on heartbeats (> 30 s), and the kernel client
#        reconnects after our server restarts
"$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M > /run/serve.log 2>&1 &
srv=$!
serving /run/serve.log
if dev=$(map idle ram0 1235); then
  sleep 35
  if fio_verified "$dev" 1 --runtime=2; then
    ok "idle session alive after 35 s, verified"
  else
    bad "idle session died"
  fi
  kill -INT $srv; wait $srv
  "$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M > /run/serve2.log 2>&1 &
  srv=$!
  serving /run/serve2.log
  # The kernel client sees the path go down, then reconnects after RNBD's
  # delay (30 s, set when rnbd-client opens the session; no knob) and
  # re-opens the device.
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
  if [ $down = 1 ] && fio_verified "$dev" 1 --runtime=2; then
    ok "kernel client reconnected after our server restarted, verified"
  else
    bad "no reconnect after restart"; tail -5 /run/serve2.log
  fi
  unmap "$dev"
  kill -INT $srv; wait $srv
fi
ls /sys/block | grep -q rnbd && bad "an rnbd device is left behind" || ok "nothing left behind"

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
# --- 4. side by side: the four client/server pairs, 4 KiB random IO at QD 1
#        and 32, 64 KiB and 128 KiB at QD 8 (bandwidth), always_invalidate on
#        and off (both servers alike); one line per figure in /run/figs, then a
#        table and the ratios against the kernel pair
: > /run/figs
fig() { echo "$1 $2 $3 $4 $5 ${6:-0}" >> /run/figs; } # pair rw bs qd ai iops
# In this TCG guest a fio start costs ~6 s (it loads 64 shared libraries)
# and a python3 start ~3 s: every figure of a server comes from one fio (a
# job each, one after the other), read with jq.
fio_jobs() { # DEV "RW:BS:QD ..." -> a line "RW BS QD IOPS" per job that ran without error
  local dev=$1 j args=()
  for j in $2; do
    IFS=: read -r rw bs qd <<< "$j"
    args+=(--name="$rw:$bs:$qd" --stonewall --rw="$rw" --bs="$bs" --iodepth="$qd")
  done
  fio --filename="$dev" --direct=1 --ioengine=libaio --runtime="$SECS" --time_based --size=32M \
    --thread --output-format=json "${args[@]}" 2>/dev/null |
    jq -r '.jobs[] | select(.error == 0) | "\(.jobname | gsub(":"; " ")) \(.read.iops + .write.iops | floor)"'
}
ours_iops() { # ADDR DEVICE RW BS QD [CORES] -> IOPS
  # Each core keeps its share of the QD in flight (the same total).
  local cores=${6:-0} n
  n=$(tr , '\n' <<< "$cores" | wc -l)
  local qd=$(($5 / n))
  "$BIN/rtrs-perf" client --connect "rdma:$IP:$1" --rnbd-device "$2" --rw "$3" --bs "$4" --iodepth "$qd" \
    --cores "$cores" --runtime "$SECS" --size 32M --json 2>/dev/null | jq -r 'if .errors == 0 then .iops | floor else 0 end'
}
core_tid() { # PID NAME -> the tid of its thread NAME
  for t in /proc/$1/task/*; do [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ] && { echo "${t##*/}"; return; }; done
}
# The sizes of the side by side: all of them with always_invalidate on, 4 KiB
# with it off (the test command's time: docs/testing.md); INTEROP_FULL=1: all
# of them both ways.
sizes="4k:1 4k:32 64k:8 128k:8"
sizes_off=$([ "${INTEROP_FULL:-}" = 1 ] && echo "$sizes" || echo "4k:1 4k:32")
sizes_for() { [ "$ai" = on ] && echo "$sizes" || echo "$sizes_off"; }
# The kernel's client half of a side by side: one fio on DEV, a figure per
# job as TAG; fails when a job gave none.
fio_side() { # TAG DEV
  local n=0 rw bs qd iops c jobs=
  for c in $(sizes_for); do
    for rw in randread randwrite; do jobs+=" $rw:$c"; done
  done
  at "4. $1, always_invalidate $ai (one fio)"
  # (a file, not a process substitution: the guest has no /dev/fd)
  fio_jobs "$2" "$jobs" > /run/fio-figs
  while read -r rw bs qd iops; do
    fig "$1" "$rw" "$bs" "$qd" $ai "$iops"
    n=$((n + 1))
  done < /run/fio-figs
  [ "$n" = "$(wc -w <<< "$jobs")" ]
}
# Our client's half: an rtrs-perf a figure to PORT's export NAME, as TAG;
# on CORES (default 0) where the QD is more than 1.
ours_side() { # TAG PORT NAME [CORES]
  local c bs qd obs rw cores
  at "4. $1, always_invalidate $ai (an rtrs-perf a figure)"
  for c in $(sizes_for); do
    bs=${c%:*} qd=${c##*:} obs=$([ "${c%:*}" = 128k ] && echo 124k || echo "${c%:*}")
    for rw in randread randwrite; do
      cores=$([ "$qd" -gt 1 ] && echo "${4:-0}" || echo 0)
      fig "$1" $rw $bs $qd $ai "$(ours_iops "$2" "$3" $rw $obs $qd "$cores")"
    done
  done
}
for ai in on off; do
  kai=$([ $ai = on ] && echo Y || echo N)
  rmmod rnbd-server 2>/dev/null; rmmod rtrs-server 2>/dev/null
  insmod "$RTRS_KMODS/rtrs/rtrs-server.ko" always_invalidate=$kai; insmod "$RTRS_KMODS/rnbd/rnbd-server.ko"
  # Each pair gets its own device: an RW open excludes other writers.
  kdev=$(map "kk$ai" /dev/ram0 1234) || { bad "map kk$ai"; exit 1; }
  # Phase 1, the kernel's server alone (no poller of ours holds a vCPU):
  # the kernel's client and ours against it. One RTRS IO carries at most
  # max_io_size (124 KiB with 128 KiB chunks; the kernel's block layer
  # splits a 128 KiB bio in two): ours at 124k.
  kkdev=$kdev
  if [ "${INTEROP_BREAK_KK:-}" = 1 ]; then # the first such fio gets no device (tries the retry)
    kkdev=/dev/none INTEROP_BREAK_KK=done
  fi
  if ! fio_side kk "$kkdev"; then
    # The reference itself failed: soft-RoCE under the kernel's RTRS now and
    # then fails the kernel server's REG_MR ("local QP operation error") and
    # the session drops. Not ours to count: said, and measured again once on
    # a fresh mapping; a second failure fails the step.
    echo "INTEROP NOTE: the kernel pair failed (always_invalidate $ai), its kernel log:"
    dmesg | grep -E 'rtrs_|rnbd_' | grep -v 'I/O error' | tail -4
    echo "INTEROP NOTE: measuring the kernel pair again on a fresh mapping"
    sed -i "/^kk .* $ai [0-9]*\$/d" /run/figs
    unmap "$kdev"
    kdev=$(map "kk${ai}2" /dev/ram0 1234) || { bad "map kk${ai}2"; exit 1; }
    fio_side kk "$kdev" || bad "the kernel pair failed twice (always_invalidate $ai)"
  fi
  # Our client on both vCPUs where it has more than one IO in flight (QD/2
  # each): the kernel's server does its work in softirq on the vCPU that
  # posted, so one poller funnels all of it onto one vCPU while the other
  # idles (QD32 0.7-0.9x the kernel pair on one core, 1.4-2.2x on two in
  # docs/PERF.md). Against our server (oo) it stays on core 0: the server
  # polls core 1.
  ours_side ok 1234 /dev/ram1 0,1
  at "5a. our client's syscalls, always_invalidate $ai"
  # --- 5a. syscalls per IO on our client's data core (perf's raw_syscalls
  #         tracepoint, per thread), 4 KiB QD1, reads with per-IO keys too
  # (the client's count does not depend on the server's always_invalidate:
  # measured with it on; INTEROP_FULL=1 both)
  for keys in session per-io; do
    [ $ai = off ] && [ "${INTEROP_FULL:-}" != 1 ] && continue
    for rw in randread randwrite; do
      [ $keys = per-io ] && [ $rw = randwrite ] && continue
      # Every syscall event of rtrs-perf's threads (perf follows the
      # command's threads), with the thread's name: the core thread's
      # (rtrs-clt0) against the run's IOs. (System-wide, -a, recorded ~90x
      # the events for the same count: 45 s a run in the guest, not 19.)
      perf record -q -e raw_syscalls:sys_enter -c 1 -m 1024 -o /run/sys.data -- \
        "$BIN/rtrs-perf" client --connect "rdma:$IP:1234" --rnbd-device /dev/ram1 --rw $rw --bs 4k \
        --iodepth 1 --runtime "$SECS" --size 32M --read-keys $keys --json > /run/cl.json 2>/dev/null
      ios=$(jq .ios /run/cl.json 2>/dev/null)
      calls=$(perf script -i /run/sys.data -F comm 2>/dev/null | grep -c '^ *rtrs-clt0 *$')
      echo "syscalls client-$keys $rw $ai ${calls:-x} ${ios:-0}" >> /run/figs
    done
  done
  # Phase 2, our server: the kernel's client and ours against it.
  "$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M --export ram1=ram:64M \
    --always-invalidate $ai > /run/serve.log 2>&1 &
  srv=$!
  serving /run/serve.log
  odev=$(map "ko$ai" ram0 1235) || { bad "map ko$ai"; exit 1; }
  fio_side ko "$odev" || bad "the kernel's client against our server: a figure is missing (always_invalidate $ai)"
  ours_side oo 1235 ram1
  at "5b. our server's syscalls, always_invalidate $ai"
  # --- 5b. syscalls per IO on our server's data core under the kernel client
  for rw in randread randwrite; do
    perf stat -x, -e raw_syscalls:sys_enter -t "$(core_tid $srv rtrs-core0)" -o /run/pstat.srv -- \
      fio --name=i --filename="$odev" --direct=1 --rw=$rw --bs=4k --iodepth=1 --ioengine=libaio \
      --runtime="$SECS" --time_based --size=32M --output-format=json > /run/fio.json 2>/dev/null
    ios=$(jq '.jobs[0].read.total_ios + .jobs[0].write.total_ios' /run/fio.json)
    calls=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' /run/pstat.srv)
    echo "syscalls server $rw $ai ${calls:-x} ${ios:-0}" >> /run/figs
  done
  unmap "$kdev"; unmap "$odev"
  kill -INT $srv; wait $srv
done
at "6. --poll-sched idle"
# --- 6. the poll cores' scheduling (docs/deploy.md): the kernel's client
#        against our server with --poll-sched idle, 4 KiB QD 1 and 32,
#        always_invalidate on, beside section 4's figures (--poll-sched normal)
"$BIN/rtrs" serve --cores 1 --listen "rdma:$IP:1235" --export ram0=ram:64M --poll-sched idle \
  > /run/serve.log 2>&1 &
srv=$!
serving /run/serve.log
odev=$(map "psidle" ram0 1235) || { bad "map psidle"; exit 1; }
fio_jobs "$odev" "randread:4k:1 randwrite:4k:1 randread:4k:32 randwrite:4k:32" |
  while read -r rw _ qd iops; do echo "sched ko $rw $qd idle $iops" >> /run/figs; done
unmap "$odev"
kill -INT $srv; wait $srv
at "the tables"
python3 - /run/figs "$sizes" "$sizes_off" <<'PY' || fail=1
import sys
from collections import defaultdict
figs, sysc, sched = {}, [], {}
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "syscalls":
        sysc.append(f[1:])
    elif f[0] == "sched":
        sched[tuple(f[1:5])] = float(f[5]) if len(f) > 5 else 0.0
    else:
        figs[tuple(f[:5])] = float(f[5])
names = {"kk": "kernel -> kernel", "ko": "kernel -> ours", "ok": "ours -> kernel", "oo": "ours -> ours"}
print("| always_invalidate | rw | bs | QD | kernel -> kernel | kernel -> ours | ours -> kernel (QD > 1: 2 cores) | ours -> ours |")
print("|---|---|---|---|---:|---:|---:|---:|")
keys = sorted({k[1:] for k in figs}, key=lambda k: (k[3] != "on", k[0], int(k[1][:-1]), int(k[2])))
for rw, bs, qd, ai in keys:
    kk = figs.get(("kk", rw, bs, qd, ai), 0)
    cells = []
    for p in ("kk", "ko", "ok", "oo"):
        v = figs.get((p, rw, bs, qd, ai), 0)
        mbs = v * int(bs[:-1]) / 1024
        if p in ("ok", "oo") and bs == "128k":
            mbs = v * 124 / 1024  # ours at 124k (max_io_size)
        cell = "%.0f" % v if bs == "4k" else "%.0f (%.1f MiB/s)" % (v, mbs)
        if p != "kk" and kk:
            # Bandwidth rows compare MiB/s (ours moves 124 KiB per IO at 128k).
            kmbs = kk * int(bs[:-1]) / 1024
            cell += " %.2fx" % ((mbs / kmbs) if bs != "4k" else (v / kk))
        cells.append(cell)
    print("| %s | %s | %s | %s | %s |" % (ai, rw, bs, qd, " | ".join(cells)))
print()
print("| data core | rw | always_invalidate | syscalls | IOs | per IO |")
print("|---|---|---|---:|---:|---:|")
bad = False
for who, rw, ai, calls, ios in sysc:
    if not calls.isdigit():
        print("INTEROP FAIL: no syscall count for %s %s always_invalidate=%s" % (who, rw, ai))
        bad = True
        continue
    calls, ios = int(calls), int(ios)
    per = calls / ios if ios else float("inf")
    print("| %s | %s | %s | %d | %d | %.2f |" % (who, rw, ai, calls, ios, per))
    # One post per IO: the request (client) or the response chain (server),
    # re-keys and invalidations riding in it. A bind or invalidation of its
    # own per IO shows as 2 or more; below 0.5 the count itself is broken
    # (every IO is a post, a syscall on soft-RoCE).
    if per > 1.5 or per < 0.5:
        print("INTEROP FAIL: %s %s always_invalidate=%s: %.2f syscalls per IO (one expected: 0.5-1.5)" % (who, rw, ai, per))
        bad = True
print()
print("| pair | rw | QD | poll_sched normal | poll_sched idle | idle / normal |")
print("|---|---|---:|---:|---:|---:|")
for who, rw, qd in sorted({k[:3] for k in sched}, key=lambda k: (int(k[2]), k[1])):
    # normal: section 4's figure (same server flags, --poll-sched normal)
    n, i = figs.get((who, rw, "4k", qd, "on"), 0), sched.get((who, rw, qd, "idle"), 0)
    print("| %s | %s | %s | %.0f | %.0f | %s |" % (names[who], rw, qd, n, i, "%.2fx" % (i / n) if n else "-"))
# Every pair at every size, direction and always_invalidate, and the four
# --poll-sched idle figures: a figure that is absent (its fio or rtrs-perf
# did not run) fails as a zero does.
want = [(p, rw, bs, qd, ai) for p in names for rw in ("randread", "randwrite")
        for ai, sizes in (("on", sys.argv[2]), ("off", sys.argv[3]))
        for bs, qd in (c.split(":") for c in sizes.split())]
want += [("ko", rw, qd, "idle") for rw in ("randread", "randwrite") for qd in ("1", "32")]
missing = [k for k in want if (figs if len(k) == 5 else sched).get(k, 0) == 0]
for k in missing:
    print("INTEROP FAIL: no figure for %s" % " ".join(k))
sys.exit(1 if bad or missing else 0)
PY
exit $fail
