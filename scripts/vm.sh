#!/usr/bin/env bash
# The project's VM harness for real verbs: one VM (Debian's 6.1 kernel under
# qemu TCG, soft-RoCE, the kernel's RTRS and RNBD modules; see
# scripts/vm-lib.sh) that runs GUEST_SCRIPT chrooted in this host's /, mounted
# read-only over 9p; /run is a writable tmpfs. The guest's eth0 is qemu's user
# network, 10.0.2.15. Downloads, the module build and the initrd are cached.
# scripts/vm2.sh is the two-VM mode.
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
# shellcheck source=scripts/vm-lib.sh
source scripts/vm-lib.sh

vm_guest "scripts/vm.sh GUEST_SCRIPT" "${1:-}"
vm_prepare

step "booting $KVER (TCG) to run $GUEST"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
vm_qemu_args "${VM_MEM:-2G}" 2 "$GUEST" rtrs_net=eth0=10.0.2.15/24
timeout "${VM_TIMEOUT:-900}" "${VM_QEMU[@]}" -nographic \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 2>&1 | vm_console_filter | tee "$LOG" || true
rc=$(vm_guest_rc "$LOG")
if [ -z "$rc" ]; then
  echo "vm.sh: the guest did not finish (timeout or crash)" >&2
  exit 1
fi
exit "$rc"
