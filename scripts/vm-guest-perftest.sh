# Guest script (run by scripts/vm.sh; BIN: the directory of an rdma-built
# rtrs-perf, default this checkout's target/release): perftest's flags on real verbs. Two soft-RoCE devices, rxe0 on
# eth0 and rxe1 on a veth; `fabric-lat -d` picks each (the PD and QP on the
# device that carries its address, not the first device), and a device with
# no such name or GID index is refused.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
# veth is a module the initrd does not load: from the cached kernel image.
insmod "${RTRS_VM_CACHE:-/var/cache/rtrs-poll-vm}/img/lib/modules/$(uname -r)/kernel/drivers/net/veth.ko"
ip link add pt0 type veth peer name pt1
ip addr add 10.9.0.1/24 dev pt0
ip addr add 10.9.0.2/24 dev pt1
ip link set pt0 up
ip link set pt1 up
rdma link add rxe0 type rxe netdev eth0
rdma link add rxe1 type rxe netdev pt0
sleep 1
ibv_devices
for d in rxe0 rxe1; do
  out=$(timeout 120 "$BIN/rtrs-perf" fabric-lat -d "$d" --size 64 --iters 500 --warmup 50 --cores 0,1 --json)
  echo "$d: $out"
  echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["fabric"] == "rdma", d
assert d["one_way_ns"]["p50"] == (d["lat_ns"]["p50"] + 1) // 2, d
'
done
# Whole output first: `| grep -q` would close the pipe on the first match.
text=$(timeout 120 "$BIN/rtrs-perf" fabric-lat -d rxe1 --size 64 --iters 1000 --warmup 100 --cores 0,1)
grep -q "one-way = RTT/2" <<<"$text"
if "$BIN/rtrs-perf" fabric-lat -d rxe9 --iters 10 2>/run/err; then
  echo "fabric-lat -d rxe9 ran" >&2; exit 1
fi
grep -q 'no RDMA device "rxe9" (have: ' /run/err
if "$BIN/rtrs-perf" fabric-lat -d rxe1 --gid-index 200 --iters 10 2>/run/err; then
  echo "fabric-lat --gid-index 200 ran" >&2; exit 1
fi
grep -q "GID index 200" /run/err
echo "perftest flags: fabric-lat -d rxe0 and -d rxe1 ran over their devices; bad ones refused"
