#!/usr/bin/env bash
# Builds rtrs-perf with the rdma backend and runs scripts/vm-guest-perftest.sh
# in the VM: fabric-lat's -d/--ib-dev, --gid-index and one-way latency over
# two soft-RoCE devices. Needs root (scripts/vm.sh); exit 77 when it cannot
# run here. About two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
need_root "scripts/vm.sh"
build_bins
exec scripts/vm.sh scripts/vm-guest-perftest.sh
