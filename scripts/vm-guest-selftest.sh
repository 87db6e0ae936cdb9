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
fio --name=selftest --filename=/dev/rnbd0 --direct=1 --rw=randwrite --bs=4k --size=4M \
  --verify=crc32c --ioengine=libaio --iodepth=8 --verify_state_save=0 | grep -E 'IOPS|err='
echo "normal" > /sys/block/rnbd0/rnbd/unmap_device
echo "selftest: kernel RNBD client -> kernel RNBD server over soft-RoCE: verified"
