#!/usr/bin/env bash
# Runs the fabric conformance suite and the engine's end-to-end suite over
# real verbs: builds tests/fabric_rdma.rs with the rdma feature and runs the
# test binary in the VM (scripts/vm.sh) on soft-RoCE. Exit 77 when the VM
# cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# Before the rdma test build: without root the VM cannot run.
need_root "scripts/vm.sh"
bin=$(cargo test -q -p rtrs-poll --features rdma --test fabric_rdma --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "fabric_rdma" in m["executable"]:
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "vm-rdma-tests: the fabric_rdma test binary did not build" >&2; exit 1; }
guest=$(mktemp /tmp/rtrs-rdma-tests.XXXXXX.sh)
trap 'rm -f "$guest"' EXIT
cat > "$guest" <<GUEST
set -e
rdma link add rxe0 type rxe netdev eth0
ibv_devices
$bin --test-threads=1 ${RDMA_TEST_FILTER:-}
# The key fallbacks: devices without type-2 windows (per-IO read keys are
# type-1 windows, invalidated here), and without windows at all (keys are
# registrations; the keys thread makes the spares).
keys="rekey invalidat write_read_verified"
echo "== without type-2 windows (RTRS_RDMA_NO_MW2=1)"
RTRS_RDMA_NO_MW2=1 $bin --test-threads=1 \$keys
echo "== without memory windows (RTRS_RDMA_NO_MW=1)"
RTRS_RDMA_NO_MW=1 $bin --test-threads=1 \$keys
GUEST
chmod 644 "$guest"
scripts/vm.sh "$guest"
