# Guest script (run by scripts/vm.sh): the harness's self-test. Soft-RoCE
# comes up, the kernel's RTRS/RNBD modules load, and the kernel's own RNBD
# client maps the kernel's own server's /dev/ram0 and passes fio --verify.
set -euo pipefail
rdma link add rxe0 type rxe netdev eth0
ibv_devices
for m in rtrs/rtrs-core rtrs/rtrs-server rtrs/rtrs-client rnbd/rnbd-server rnbd/rnbd-client; do
  insmod "$RTRS_KMODS/$m.ko"
done
echo "sessname=selftest path=ip:10.0.2.15 device_path=/dev/ram0" > /sys/devices/virtual/rnbd-client/ctl/map_device
for _ in $(seq 50); do [ -b /dev/rnbd0 ] && break; sleep 0.1; done
# Size-based (not time-based): fio writes the 4 MiB, then its verify phase
# reads every block back; the check is that it did (issued reads = 1024).
fio --name=selftest --filename=/dev/rnbd0 --direct=1 --rw=randwrite --bs=4k --size=4M \
  --verify=crc32c --verify_fatal=1 --ioengine=libaio --iodepth=8 --verify_state_save=0 > /run/selftest.fio
grep -E 'IOPS|err=|issued rwts' /run/selftest.fio
reads=$(sed -n 's/.*issued rwts: total=\([0-9]*\),.*/\1/p' /run/selftest.fio | head -1)
[ "${reads:-0}" = 1024 ] || { echo "selftest: fio read back ${reads:-0} blocks, not 1024"; exit 1; }
echo "normal" > /sys/block/rnbd0/rnbd/unmap_device
echo "selftest: kernel RNBD client -> kernel RNBD server over soft-RoCE: verified"
