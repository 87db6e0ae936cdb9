#!/usr/bin/env bash
# The project's VM harness for real verbs: boots Debian's 6.1 kernel under
# qemu (TCG: this host's nested KVM cannot boot a stock kernel) with soft-RoCE
# (rdma_rxe) and the kernel's RTRS and RNBD modules, built from Debian's
# linux-source-6.1 package (Debian's config does not enable them). The guest
# mounts this host's / read-only over 9p and runs GUEST_SCRIPT there with bash,
# so cargo-built binaries run unchanged; /run is a writable tmpfs. Downloads,
# the module build and the initrd are cached.
#
#   scripts/vm.sh GUEST_SCRIPT        exit status: the guest script's
#   env: RTRS_VM_CACHE (default /var/cache/rtrs-poll-vm), VM_TIMEOUT (s, 900),
#        VM_MEM (2G)
# In the guest: $RTRS_KMODS is the directory of the built rtrs/ and rnbd/ .ko.
# Exit 77 when it cannot run here (not root, no qemu and no apt), with why.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

[ $# -ge 1 ] || { echo "usage: scripts/vm.sh GUEST_SCRIPT" >&2; exit 2; }
GUEST=$(readlink -f "$1")
[ -f "$GUEST" ] || { echo "vm.sh: no such guest script: $1" >&2; exit 2; }
if [ "$(id -u)" -ne 0 ]; then
  echo "vm.sh: skipped: needs root (packages, the kernel module build, qemu's 9p export of /)" >&2
  exit 77
fi
CACHE=${RTRS_VM_CACHE:-/var/cache/rtrs-poll-vm}
mkdir -p "$CACHE"

ensure_packages qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-providers \
  ibverbs-utils rdmacm-utils perftest fio xz-utils make gcc
command -v qemu-system-x86_64 >/dev/null || { echo "vm.sh: skipped: qemu-system-x86_64 unavailable" >&2; exit 77; }

# Image, headers and source of one kernel version: the newest 6.1 Debian has.
if [ ! -s "$CACHE/kver" ]; then
  apt-get update -qq
  img=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  ver=$(apt-cache policy "$img" | awk '/Candidate:/ {print $2}')
  echo "${img#linux-image-} $ver" > "$CACHE/kver"
fi
read -r KVER PKGVER < "$CACHE/kver"
ensure_packages "linux-headers-$KVER"

if [ ! -f "$CACHE/img/boot/vmlinuz-$KVER" ]; then
  step "fetching linux-image-$KVER"
  (cd "$CACHE" && apt-get download -q "linux-image-$KVER=$PKGVER" &&
    dpkg -x linux-image-"$KVER"_*.deb img && rm -f linux-image-"$KVER"_*.deb)
  /usr/sbin/depmod -b "$CACHE/img" "$KVER"
fi

KMODS=$CACHE/kmods
if [ ! -f "$KMODS/rnbd/rnbd-server.ko" ]; then
  step "building the kernel's RTRS and RNBD modules from linux-source-6.1"
  (cd "$CACHE" && apt-get download -q "linux-source-6.1=$PKGVER" &&
    rm -rf src && dpkg -x linux-source-6.1_*.deb src && rm -f linux-source-6.1_*.deb)
  tar -C "$CACHE/src" -xf "$CACHE"/src/usr/src/linux-source-6.1.tar.xz \
    linux-source-6.1/drivers/infiniband/ulp/rtrs linux-source-6.1/drivers/block/rnbd
  rm -rf "$KMODS" && mkdir -p "$KMODS"
  cp -r "$CACHE"/src/linux-source-6.1/drivers/infiniband/ulp/rtrs "$KMODS"/
  cp -r "$CACHE"/src/linux-source-6.1/drivers/block/rnbd "$KMODS"/
  H=/usr/src/linux-headers-$KVER
  make -s -C "$H" M="$KMODS/rtrs" CONFIG_INFINIBAND_RTRS=m CONFIG_INFINIBAND_RTRS_CLIENT=m \
    CONFIG_INFINIBAND_RTRS_SERVER=m modules -j2
  make -s -C "$H" M="$KMODS/rnbd" CONFIG_BLK_DEV_RNBD_CLIENT=m CONFIG_BLK_DEV_RNBD_SERVER=m \
    ccflags-y=-I"$KMODS/rtrs" KBUILD_EXTRA_SYMBOLS="$KMODS/rtrs/Module.symvers" modules -j2
  rm -rf "$CACHE/src"
fi

INITRD=$CACHE/initrd-$KVER.img
if [ ! -f "$INITRD" ]; then
  step "making the initrd"
  d=$(mktemp -d)
  mkdir -p "$d"/{bin,proc,sys,dev,host,lib/modules}
  cp /bin/busybox "$d/bin/"
  # rdma_rxe needs crc32_generic loaded first ("failed to init crc32").
  wanted="crc32_generic rdma_rxe rdma_ucm ib_uverbs virtio_net virtio_pci brd 9p 9pnet_virtio"
  order=$(for m in $wanted; do /usr/sbin/modprobe -d "$CACHE/img" -S "$KVER" --show-depends "$m"; done |
    awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++')
  for f in $order; do cp "$f" "$d/lib/modules/"; done
  {
    echo '#!/bin/busybox sh'
    echo '/bin/busybox --install -s /bin'
    echo 'mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev'
    for f in $order; do echo "insmod /lib/modules/${f##*/}"; done
    echo 'ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0'
    echo 'mount -t 9p -o trans=virtio,version=9p2000.L,ro hostfs /host'
    echo 'for m in proc sys dev; do mount --rbind /$m /host/$m 2>/dev/null || mount -t $m $m /host/$m; done'
    echo 'mount -t tmpfs t /host/run'
    echo 'script=$(sed -n "s/.*rtrs_guest=\([^ ]*\).*/\1/p" /proc/cmdline)'
    echo 'kmods=$(sed -n "s/.*rtrs_kmods=\([^ ]*\).*/\1/p" /proc/cmdline)'
    echo 'echo "=== guest up after $(cut -d" " -f1 /proc/uptime) s"'
    echo 'RTRS_KMODS=$kmods HOME=/run TMPDIR=/run chroot /host /bin/bash -c "cd /run && bash $script" 2>&1'
    echo 'echo "=== guest rc=$?"'
    echo 'poweroff -f'
  } > "$d/init"
  chmod +x "$d/init"
  (cd "$d" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$INITRD")
  rm -rf "$d"
fi

step "booting $KVER (TCG) to run $GUEST"
LOG=$(mktemp)
# The TSC as clocksource: left alone, the guest picks the HPET, and every
# clock read (fio's, the block layer's accounting, our pollers') becomes an
# emulated MMIO access in a syscall; real servers read the TSC in the vDSO.
# Override with VM_CLOCK="" to keep the kernel's choice.
timeout "${VM_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max -m "${VM_MEM:-2G}" -smp 2 \
  -kernel "$CACHE/img/boot/vmlinuz-$KVER" -initrd "$INITRD" -nographic -no-reboot \
  -append "console=ttyS0 quiet panic=-1 ${VM_CLOCK-clocksource=tsc tsc=reliable} rtrs_guest=$GUEST rtrs_kmods=$KMODS" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
  -virtfs local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap 2>&1 |
  sed -u -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\r//g' |
  grep --line-buffered -v -E '^(SeaBIOS|iPXE|Press Ctrl-B|Booting from ROM)' | tee "$LOG" || true
rc=$(sed -n 's/^=== guest rc=\([0-9]*\).*/\1/p' "$LOG" | tail -1)
rm -f "$LOG"
if [ -z "$rc" ]; then
  echo "vm.sh: the guest did not finish (timeout or crash)" >&2
  exit 1
fi
exit "$rc"
