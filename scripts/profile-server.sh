#!/usr/bin/env bash
# Profiles our server under the kernel's rnbd-client in the VM (soft-RoCE):
# fio 4 KiB random IO per case with `perf record -a -g` in the guest, the
# hottest symbols printed. A tool for docs/PERF.md, not part of the tests.
#
#   scripts/profile-server.sh [SECONDS] [CASES] [on|off]
#   e.g. scripts/profile-server.sh 5 "randread:1 randwrite:32" on
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages "${TEST_PACKAGES[@]}"
cargo build --release -q --features rdma -p rtrs-cli
run_in_vm "export BIN=$PWD/target/release SECS=${1:-5} CASES='${2:-randread:1 randwrite:1 randread:32 randwrite:32}' AI=${3:-on}" \
  scripts/vm-guest-profile.sh
