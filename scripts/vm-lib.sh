# shellcheck shell=bash
# The VM harness's shared part (sourced after scripts/lib.sh, not run): the
# cached kernel, the kernel's RTRS/RNBD modules and the initrd, and the qemu
# command line, for scripts/vm.sh (one VM) and scripts/vm2.sh (two VMs joined
# by host bridges).
#
# Debian's 6.1 kernel boots under qemu TCG (this host's nested KVM cannot boot
# a stock kernel); the RTRS and RNBD modules are built from Debian's
# linux-source-6.1 (Debian's config does not enable them). The guest mounts
# this host's / read-only over 9p and runs a host script there chrooted with
# bash, so cargo-built binaries run unchanged; /run is a writable tmpfs.
#
# The initrd's init reads the kernel command line:
#   rtrs_guest=PATH        the script to run (a host path)
#   rtrs_kmods=DIR         the built rtrs/ and rnbd/ .ko, as $RTRS_KMODS
#   rtrs_net=DEV=A/L,...   addresses to put on the guest's NICs
#   rtrs_name=NAME         $RTRS_VM in the script
#   rtrs_ctl=1             mount the 9p share tagged "ctl" read-write at /run/ctl
#                          ($RTRS_CTL in the script; empty without it)
# and prints "=== guest rc=N" when the script ends, then powers off.

# GUEST=the absolute path of the guest script $2, checked; $1 is the usage line.
vm_guest() {
  [ -n "${2:-}" ] || { echo "usage: $1" >&2; exit 2; }
  GUEST=$(readlink -f "$2")
  [ -f "$GUEST" ] || { echo "no such guest script: $2" >&2; exit 2; }
}

# Checks that the harness can run (root, qemu), installs what is missing and
# fills the cache. Sets CACHE, KVER, KMODS and INITRD. Exits 77 with the reason
# when it cannot run here (lib.sh's skip).
vm_prepare() {
  need_root "packages, the kernel module build, qemu's 9p export of /"
  CACHE=${RTRS_VM_CACHE:-/var/cache/rtrs-poll-vm}
  mkdir -p "$CACHE"
  ensure_packages qemu-system-x86 busybox-static cpio kmod rdma-core ibverbs-providers \
    ibverbs-utils rdmacm-utils perftest fio xz-utils make gcc iproute2
  command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 unavailable"

  # Image, headers and source of one kernel version: the newest 6.1 Debian has.
  if [ ! -s "$CACHE/kver" ]; then
    apt-get update -qq
    local img ver
    img=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    ver=$(apt-cache policy "$img" | awk '/Candidate:/ {print $2}')
    echo "${img#linux-image-} $ver" > "$CACHE/kver"
  fi
  local pkgver
  read -r KVER pkgver < "$CACHE/kver"
  ensure_packages "linux-headers-$KVER"

  if [ ! -f "$CACHE/img/boot/vmlinuz-$KVER" ]; then
    step "fetching linux-image-$KVER"
    (cd "$CACHE" && apt-get download -q "linux-image-$KVER=$pkgver" &&
      dpkg -x linux-image-"$KVER"_*.deb img && rm -f linux-image-"$KVER"_*.deb)
    /usr/sbin/depmod -b "$CACHE/img" "$KVER"
  fi

  KMODS=$CACHE/kmods
  local rxe_want
  rxe_want=$(vm_rxe_fix_text | sha1sum | cut -c1-10)
  if [ ! -f "$KMODS/rnbd/rnbd-server.ko" ] ||
    [ "$(cat "$KMODS/rxe/fix" 2>/dev/null)" != "$rxe_want" ]; then
    step "building the kernel's RTRS and RNBD modules and soft-RoCE (with our fix) from linux-source-6.1"
    (cd "$CACHE" && apt-get download -q "linux-source-6.1=$pkgver" &&
      rm -rf src && dpkg -x linux-source-6.1_*.deb src && rm -f linux-source-6.1_*.deb)
    tar -C "$CACHE/src" -xf "$CACHE"/src/usr/src/linux-source-6.1.tar.xz \
      linux-source-6.1/drivers/infiniband/ulp/rtrs linux-source-6.1/drivers/block/rnbd \
      linux-source-6.1/drivers/infiniband/sw/rxe
    rm -rf "$KMODS" && mkdir -p "$KMODS"
    cp -r "$CACHE"/src/linux-source-6.1/drivers/infiniband/ulp/rtrs "$KMODS"/
    cp -r "$CACHE"/src/linux-source-6.1/drivers/block/rnbd "$KMODS"/
    cp -r "$CACHE"/src/linux-source-6.1/drivers/infiniband/sw/rxe "$KMODS"/
    local h=/usr/src/linux-headers-$KVER
    make -s -C "$h" M="$KMODS/rtrs" CONFIG_INFINIBAND_RTRS=m CONFIG_INFINIBAND_RTRS_CLIENT=m \
      CONFIG_INFINIBAND_RTRS_SERVER=m modules -j2
    make -s -C "$h" M="$KMODS/rnbd" CONFIG_BLK_DEV_RNBD_CLIENT=m CONFIG_BLK_DEV_RNBD_SERVER=m \
      ccflags-y=-I"$KMODS/rtrs" KBUILD_EXTRA_SYMBOLS="$KMODS/rtrs/Module.symvers" modules -j2
    vm_rxe_fix "$KMODS/rxe/rxe_req.c"
    make -s -C "$h" M="$KMODS/rxe" CONFIG_RDMA_RXE=m modules -j2 2>&1 | grep -v "Skipping BTF" || true
    strip --strip-debug "$KMODS/rxe/rdma_rxe.ko"
    echo "$rxe_want" > "$KMODS/rxe/fix"
    rm -rf "$CACHE/src"
  fi
  vm_initrd
}

# Soft-RoCE's requester, as Debian's 6.1 (and 6.12) ship it, runs a local
# operation (REG_MR, BIND_MW, LOCAL_INV) again when a retransmission rewinds
# the send queue past it: a REG_MR whose key is already valid then fails
# ("rxe_reg_fast_mr: mr->lkey = ... not free"; a type-2 BIND_MW fails the
# same way, silently), the requester stops in its error state, and the QP
# neither sends nor flushes: a healthy path goes silent until a heartbeat
# declares it dead 30 s later (docs/faults-vm.md, "soft-RoCE"). Any ACK later
# than the QP's timeout (~0.5 s under rdma_cm on RoCE) is enough, which a
# TCG guest on a busy host gets. The fix below (ours) passes over a local
# operation that already ran. RTRS_VM_RXE=stock boots Debian's own module
# instead, to see the bug.
vm_rxe_fix_text() {
  cat <<'FIX'
	/* rtrs-poll: after a retry rewinds the send queue, a local
	 * operation that already ran (state done) is passed over, not
	 * run again: a second REG_MR or BIND_MW finds its key in use. */
	if ((wqe->mask & WR_LOCAL_OP_MASK) && wqe->state == wqe_state_done) {
		qp->req.wqe_index = queue_next_index(qp->sq.queue, qp->req.wqe_index);
		goto done;
	}
FIX
}
vm_rxe_fix() { # rxe_req.c -> the fix put before the fence check of rxe_requester
  local f=$1 fix
  fix=$(vm_rxe_fix_text)
  grep -q 'if (rxe_wqe_is_fenced(qp, wqe)) {' "$f" || { echo "vm: rxe_req.c has no fence check to fix" >&2; return 1; }
  FIX=$fix awk '/^\tif \(rxe_wqe_is_fenced\(qp, wqe\)\) \{$/ && !done { print ENVIRON["FIX"]; done = 1 } { print }' \
    "$f" > "$f.new" && mv "$f.new" "$f"
  grep -q 'rtrs-poll: after a retry' "$f" || { echo "vm: the soft-RoCE fix did not apply" >&2; return 1; }
}

# The init of the initrd (see the top of this file); /lib/modules/order lists
# the modules to insmod, in order.
vm_init_text() {
  cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m"; done
arg() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" /proc/cmdline; }
ip link set lo up
for spec in $(arg rtrs_net | tr , ' '); do
  ip link set "${spec%%=*}" up; ip addr add "${spec#*=}" dev "${spec%%=*}"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro hostfs /host
for m in proc sys dev; do mount --rbind /$m /host/$m 2>/dev/null || mount -t $m $m /host/$m; done
mount -t tmpfs t /host/run
ctl=
if [ -n "$(arg rtrs_ctl)" ]; then
  mkdir /host/run/ctl && mount -t 9p -o trans=virtio,version=9p2000.L ctl /host/run/ctl && ctl=/run/ctl
fi
echo "=== guest up after $(cut -d" " -f1 /proc/uptime) s"
RTRS_KMODS=$(arg rtrs_kmods) RTRS_VM=$(arg rtrs_name) RTRS_CTL=$ctl HOME=/run TMPDIR=/run \
  chroot /host /bin/bash -c "cd /run && bash $(arg rtrs_guest)" 2>&1
echo "=== guest rc=$?"
poweroff -f
INIT
}

# Makes the initrd once per kernel version and init (its name carries a hash
# of the init, so a changed init makes a new one). Sets INITRD.
vm_initrd() {
  local hash
  local rxe=${RTRS_VM_RXE:-fixed}
  case $rxe in
    fixed | stock) ;;
    *) echo "RTRS_VM_RXE=$rxe: expected fixed or stock" >&2; exit 2 ;;
  esac
  hash=$( (vm_init_text; echo "$rxe"; [ "$rxe" = stock ] || cat "$KMODS/rxe/fix") | sha1sum | cut -c1-10)
  INITRD=$CACHE/initrd-$KVER-$hash.img
  [ -f "$INITRD" ] && return 0
  step "making the initrd"
  local d order f
  d=$(mktemp -d)
  mkdir -p "$d"/{bin,proc,sys,dev,host,lib/modules}
  cp /bin/busybox "$d/bin/"
  # rdma_rxe needs crc32_generic loaded first ("failed to init crc32").
  local wanted="crc32_generic rdma_rxe rdma_ucm ib_uverbs virtio_net virtio_pci brd 9p 9pnet_virtio"
  order=$(for m in $wanted; do /usr/sbin/modprobe -d "$CACHE/img" -S "$KVER" --show-depends "$m"; done |
    awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++')
  for f in $order; do
    # soft-RoCE: ours (Debian's source with the fix above) unless asked
    [[ $rxe == fixed && ${f##*/} == rdma_rxe.ko* ]] && f=$KMODS/rxe/rdma_rxe.ko
    cp "$f" "$d/lib/modules/"
    echo "${f##*/}" >> "$d/lib/modules/order"
  done
  vm_init_text > "$d/init"
  chmod +x "$d/init"
  (cd "$d" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$INITRD.tmp") && mv "$INITRD.tmp" "$INITRD"
  rm -rf "$d"
}

# VM_QEMU=(the qemu command line both harnesses share): TCG, the cached kernel
# and initrd, this host's / read-only over 9p. Args: MEM SMP GUEST [KERNEL_ARGS...]
# (the rtrs_* arguments above besides rtrs_guest and rtrs_kmods).
vm_qemu_args() {
  local mem=$1 smp=$2 guest=$3
  shift 3
  # The TSC as clocksource: left alone, the guest picks the HPET, and every
  # clock read (fio's, the block layer's accounting, our pollers') becomes an
  # emulated MMIO access in a syscall; real servers read the TSC in the vDSO.
  # Override with VM_CLOCK="" to keep the kernel's choice.
  # shellcheck disable=SC2034 # the callers run it
  VM_QEMU=(qemu-system-x86_64 -accel tcg -cpu max -m "$mem" -smp "$smp"
    -kernel "$CACHE/img/boot/vmlinuz-$KVER" -initrd "$INITRD" -no-reboot
    -append "console=ttyS0 quiet panic=-1 ${VM_CLOCK-clocksource=tsc tsc=reliable} rtrs_guest=$guest rtrs_kmods=$KMODS $*"
    -virtfs "local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap")
}

# A guest console made readable: no escape sequences, no firmware banners.
vm_console_filter() {
  sed -u -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\r//g' |
    grep --line-buffered -v -E '^(SeaBIOS|iPXE|Press Ctrl-B|Booting from ROM)'
}

# The guest script's exit status from a console log ("=== guest rc=N"), or
# nothing when the guest did not finish.
vm_guest_rc() {
  sed -n 's/^.*=== guest rc=\([0-9]*\).*/\1/p' "$1" | tail -1
}

# Link N (1 or 2) of scripts/vm2.sh, cut from the host as a cable is cut: a
# black hole on both of its taps (whatever the bridge sends to either VM is
# dropped), no carrier change, no event in the guests. Restored by removing it.
# With VM2_TOPO=one-link both paths share the link: a cut sends only the IP
# packets to 10.N.0.0/24 into the black hole, by a u32 filter into an HTB
# class whose leaf is the black hole (this host has neither netem nor the
# gact drop action). The HTB is put on the taps before the guests boot
# (vm2_link_prepare) and a cut only adds or removes the filter: replacing a
# qdisc drops the packets queued in it, and Debian's soft-RoCE does not
# recover an RC QP that lost packets (its retransmission runs the chained
# REG_MRs again and the QP stops: vm_rxe_fix above), so a qdisc swap at the
# cut stalled the other path's QPs for good. Needs VM2_LINK1/2 and VM2_TOPO
# (set by scripts/vm2.sh for its HOST_CMD).
vm2_link_taps() {
  case $1 in
    1) echo "$VM2_LINK1" ;;
    2) echo "$VM2_LINK2" ;;
    *) echo "vm2: no link $1" >&2; return 1 ;;
  esac
}
vm2_link_prepare() { # TAP -> (one-link) the HTB, the black-hole class, no filter yet
  # No default class: what no filter picks goes out HTB's direct queue, unshaped.
  tc qdisc add dev "$1" root handle 1: htb
  tc class add dev "$1" parent 1: classid 1:2 htb rate 1gbit quantum 60000
  tc qdisc add dev "$1" parent 1:2 handle 2: tbf rate 8bit burst 1 limit 1
}
vm2_link_cut() {
  local t
  for t in $(vm2_link_taps "$1"); do
    if [ "${VM2_TOPO:-two-links}" = two-links ]; then
      tc qdisc add dev "$t" root tbf rate 8bit burst 1 limit 1
    else
      tc filter add dev "$t" parent 1: protocol ip prio "$1" u32 match ip dst "10.$1.0.0/24" flowid 1:2
    fi
  done
}
vm2_link_restore() {
  local t
  for t in $(vm2_link_taps "$1"); do
    if [ "${VM2_TOPO:-two-links}" = two-links ]; then
      tc qdisc del dev "$t" root
    else
      tc filter del dev "$t" parent 1: protocol ip prio "$1"
    fi
  done
}
