#!/usr/bin/env bash
# Builds rtrs and rtrs-perf with the rdma backend and runs the interop guest
# script in the VM: our client against the kernel's RTRS/RNBD server and the
# kernel's client against ours, with verified data, then the four pairs side
# by side. Needs root (scripts/vm.sh); exit 77 when it cannot run here.
#
#   scripts/interop.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# Before the release build: without root the VM cannot run.
need_root "scripts/vm.sh"
ensure_packages linux-perf jq
build_bins
# About 11 min on a fast day (docs/testing.md); the VM gets 25.
VM_TIMEOUT=${VM_TIMEOUT:-1500} run_in_vm "export BIN=$PWD/target/release SECS=${1:-5} INTEROP_BREAK_KK=${INTEROP_BREAK_KK:-} INTEROP_FULL=${INTEROP_FULL:-}" scripts/vm-guest-interop.sh
