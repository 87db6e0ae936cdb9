#!/usr/bin/env bash
# The VM harness's two-host mode: VMs "a" and "b" (the kernel, modules and
# initrd of scripts/vm.sh, see scripts/vm-lib.sh; 1 vCPU each) joined by two
# virtual links, one per RTRS path. Each link is a bridge on this host with the
# two VMs' tap devices on it, so the host can cut a link the way a cable is
# cut: vm2_link_cut puts a black hole (tbf with a 1-byte limit) on both taps
# of the link; the guests see no link event, their packets just vanish.
#
#   link 1: a eth0 10.1.0.1/24 <-> b eth0 10.1.0.2/24 (the guest script puts rxe0 on eth0)
#   link 2: a eth1 10.2.0.1/24 <-> b eth1 10.2.0.2/24 (rxe1 on eth1)
#
# VM2_TOPO=one-link instead joins the VMs by one link (one bridge, eth0 only)
# that carries both subnets, for a guest with one RDMA device (rxe0 on eth0)
# but two paths: vm2_link_cut 1 then black-holes only the IP packets to
# 10.1.0.0/24 on the taps (a u32 filter into an HTB class whose leaf is a
# tbf black hole; ARP still passes).
#
# Both guests mount the host's / read-only and a per-run host directory
# read-write at /run/ctl ($RTRS_CTL in the guest, $VM2_CTL on the host), for
# the host to drive a timeline across the two, and both run GUEST (a host
# path) chrooted, with $RTRS_VM = a or b.
#
#   scripts/vm2.sh GUEST [HOST_CMD [ARGS...]]
#
# HOST_CMD runs on the host while the guests run, with VM2_CTL, VM2_LINK1 and
# VM2_LINK2 (the two taps of each link, for vm2_link_cut/vm2_link_restore),
# VM2_PIDS (the two qemu PIDs) and VM2_CONSOLE_A/_B (the console logs); then
# vm2.sh waits for both guests to power off. Exit status: HOST_CMD's if it
# failed, else the first failing guest's; 1 if a guest did not finish; 77 when
# it cannot run here (with why). Everything it made (qemu processes, taps,
# bridges and their qdiscs, the run directory) goes on exit, failure or Ctrl-C.
#
# env: RTRS_VM_CACHE, VM_TIMEOUT (s for the whole run, default 900),
#      VM2_GRACE (s the guests get after HOST_CMD ended, 120),
#      VM2_TOPO (two-links or one-link), VM2_MEM (1536M a VM), VM2_KEEP=DIR (copy the run directory there),
#      VM2_QUIET=1 (do not print the consoles at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# shellcheck source=scripts/vm-lib.sh
source scripts/vm-lib.sh

vm_guest "scripts/vm2.sh GUEST [HOST_CMD [ARGS...]]" "${1:-}"
shift
vm_prepare
[ -c /dev/net/tun ] || skip "no /dev/net/tun for the tap devices"

RUN=$(mktemp -d /tmp/rtrs-vm2.XXXXXX)
VM2_CTL=$RUN/ctl
mkdir -p "$VM2_CTL"
# The guests run a copy: bash reads a script as it goes, so an edit of the
# tree during a run would change what the guests execute.
cp "$GUEST" "$RUN/guest.sh"
GUEST_SRC=$GUEST
GUEST=$RUN/guest.sh
ID=rv$$ # interface names: rv<pid>l<link> (bridges), rv<pid><vm><link> (taps)
PIDS=()
NETDEVS=()

# shellcheck disable=SC2317 # run by the trap
cleanup() {
  local rc=$? p _
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  # Taps first (their qdiscs go with them), then the bridges.
  for p in "${NETDEVS[@]}"; do ip link del "$p" 2>/dev/null || true; done
  if [ -n "${VM2_KEEP:-}" ]; then mkdir -p "$VM2_KEEP" && cp -r "$RUN"/. "$VM2_KEEP"/; fi
  rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

VM2_TOPO=${VM2_TOPO:-two-links}
step "two VMs, $VM2_TOPO through host bridges ($ID*)"
case $VM2_TOPO in
  two-links) links=(1 2) ;;
  one-link) links=(1) ;;
  *) echo "vm2.sh: VM2_TOPO is two-links or one-link, not $VM2_TOPO" >&2; exit 2 ;;
esac
for l in "${links[@]}"; do
  ip link add name "${ID}l$l" type bridge forward_delay 0
  NETDEVS=("${ID}l$l" "${NETDEVS[@]}")
  for v in a b; do
    ip tuntap add dev "$ID$v$l" mode tap
    NETDEVS=("$ID$v$l" "${NETDEVS[@]}")
    ip link set "$ID$v$l" master "${ID}l$l"
    ip link set "$ID$v$l" up
    [ "$VM2_TOPO" = two-links ] || vm2_link_prepare "$ID$v$l"
  done
  ip link set "${ID}l$l" up
done
VM2_LINK1="${ID}a1 ${ID}b1" VM2_LINK2="${ID}a2 ${ID}b2"
[ "$VM2_TOPO" = two-links ] || VM2_LINK2=$VM2_LINK1
export VM2_CTL VM2_TOPO VM2_LINK1 VM2_LINK2
export VM2_CONSOLE_A=$RUN/a.console VM2_CONSOLE_B=$RUN/b.console

boot() { # VM HOSTNUM -> a qemu in the background
  local v=$1 n=$2 l nics=() net
  net=eth0=10.1.0.$n/24,eth1=10.2.0.$n/24
  for l in "${links[@]}"; do
    # Fixed PCI slots and MACs: link 1 is eth0, link 2 eth1, in both VMs.
    nics+=(-netdev "tap,id=n$l,ifname=$ID$v$l,script=no,downscript=no"
      -device "virtio-net-pci,netdev=n$l,mac=52:54:00:0$l:00:0$n,addr=0x$((l + 3))${VM2_NIC_OPTS:+,$VM2_NIC_OPTS}")
  done
  [ "$VM2_TOPO" = two-links ] || net=eth0=10.1.0.$n/24,eth0=10.2.0.$n/24
  vm_qemu_args "${VM2_MEM:-1536M}" 1 "$GUEST" rtrs_name="$v" rtrs_ctl=1 rtrs_net="$net"
  "${VM_QEMU[@]}" -display none -monitor none -serial "file:$RUN/$v.console" "${nics[@]}" \
    -virtfs "local,path=$VM2_CTL,mount_tag=ctl,security_model=none" < /dev/null &
  PIDS+=($!)
}
step "booting $KVER (TCG) twice to run $GUEST_SRC"
boot a 1
boot b 2
export VM2_PIDS="${PIDS[*]}"

deadline=$((SECONDS + ${VM_TIMEOUT:-900}))
host_rc=0
if [ $# -gt 0 ]; then
  timeout --foreground "${VM_TIMEOUT:-900}" "$@" || host_rc=$?
  # The host command is done: the guests get VM2_GRACE s more to finish.
  [ $((SECONDS + ${VM2_GRACE:-120})) -ge $deadline ] || deadline=$((SECONDS + ${VM2_GRACE:-120}))
fi
for p in "${PIDS[@]}"; do
  while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
done
rc=0
for v in a b; do
  [ "${VM2_QUIET:-}" = 1 ] || vm_console_filter < "$RUN/$v.console" | sed "s/^/[$v] /"
  grc=$(vm_guest_rc "$RUN/$v.console")
  if [ -z "$grc" ]; then
    echo "vm2.sh: guest $v did not finish (timeout or crash)" >&2
    [ "$rc" -ne 0 ] || rc=1
  elif [ "$grc" -ne 0 ] && [ "$rc" -eq 0 ]; then
    rc=$grc
  fi
done
[ $host_rc -eq 0 ] || rc=$host_rc
exit "$rc"
