#!/usr/bin/env bash
# The main job: builds rtrs-perf and runs its default (no arguments): an
# embedded RTRS server (core 1) and client (core 0) over shared memory, 4 KiB
# writes at QD 32 for 5 s, a progress line per second, then IOPS and latency.
# Arguments pass through, e.g. `scripts/run.sh --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages "${TEST_PACKAGES[@]}"
ensure_rust
reserve_hugepages 512
cargo build --release -q -p rtrs-perf
exec target/release/rtrs-perf "$@"
