#!/usr/bin/env bash
# The main job: builds rtrs-perf and runs its default (no arguments). Until the
# RTRS engine lands that is the shm fabric round-trip benchmark between two
# pinned processes; then it becomes the embedded server + client over shm.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages "${TEST_PACKAGES[@]}"
ensure_rust
reserve_hugepages 512
cargo build --release -q -p rtrs-perf
exec target/release/rtrs-perf "$@"
