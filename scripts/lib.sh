# Shared helpers for the scripts in this folder (sourced, not run).

# Debian packages the test command needs on a fresh machine.
# libibverbs-dev, librdmacm-dev and libclang-dev: the `rdma` feature (rdma-sys runs bindgen).
TEST_PACKAGES=(build-essential pkg-config libibverbs-dev librdmacm-dev libclang-dev)

# A step's header carries the seconds since the script started: the time a
# step took is the difference to the next header (CI keeps the whole run
# under 40 min; this says where it goes).
step() { printf '\n== %s  (at %d s)\n' "$*" "$SECONDS"; }

# The script cannot run here: says why (stderr, "NAME: skipped: REASON") and
# exits 77. Under root_step (RTRS_SKIP_REASON names a file) the reason is also
# kept there for the test command's summary.
skip() { # REASON...
  echo "$(basename "$0"): skipped: $*" >&2
  if [ -n "${RTRS_SKIP_REASON:-}" ]; then echo "$*" >> "$RTRS_SKIP_REASON"; fi
  exit 77
}

# Skips the script (exit 77) unless it runs as root; WHY: what needs it.
need_root() { # WHY
  [ "$(id -u)" -eq 0 ] || skip "needs root ($1)"
}

# The steps root_step could not run ("WHAT: REASON" each), their reasons
# alone, and how many steps it ran.
SKIPPED=()
SKIPPED_WHY=()
ROOT_STEPS=0

# Runs a step that may not be able to run here: exit 0 passes, 77 (the
# script's skip: not root, no qemu, ...) is recorded in SKIPPED with the
# reason the script gave, anything else fails the test command.
root_step() { # WHAT CMD [ARGS...]
  local what=$1 rc reasons why
  shift
  ROOT_STEPS=$((ROOT_STEPS + 1))
  reasons=$(mktemp /tmp/rtrs-skip.XXXXXX)
  set +e
  RTRS_SKIP_REASON=$reasons "$@"
  rc=$?
  set -e
  # The first reason: a script that skips because the one it ran did says
  # that one's.
  why=$(head -n1 "$reasons")
  rm -f "$reasons"
  case $rc in
    0) ;;
    77)
      why=${why:-no reason given (the output above may say)}
      SKIPPED+=("$what: $why")
      SKIPPED_WHY+=("$why")
      echo "step '$what' skipped: $why"
      ;;
    *) echo "step '$what' failed (rc $rc)"; exit "$rc" ;;
  esac
}

# The test command's last words: "all green" only when every step ran;
# otherwise "PARTIAL", each skipped step with its reason, and the reasons
# counted. Exit status 0 either way (a developer's run as non-root is
# partial by nature), 1 for a partial run with RTRS_REQUIRE_ALL=1.
summary() {
  if [ ${#SKIPPED[@]} -eq 0 ]; then
    step "all green"
    return 0
  fi
  local n=${#SKIPPED[@]} s
  step "PARTIAL: $n of $ROOT_STEPS steps skipped (they need root, qemu or a tool missing here)"
  for s in "${SKIPPED[@]}"; do echo "  skipped: $s"; done
  printf '%s\n' "${SKIPPED_WHY[@]}" | sort | uniq -c | sort -rn |
    while read -r c why; do echo "  $c x: $why"; done
  if [ "${RTRS_REQUIRE_ALL:-0}" = 1 ]; then
    echo "RTRS_REQUIRE_ALL=1: a partial run fails"
    return 1
  fi
}

# Install the Debian packages that are missing, when we are root; otherwise say
# what is missing and go on (the build will tell whether it mattered).
ensure_packages() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    step "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "warning: missing packages ${missing[*]} (not root: not installing)" >&2
  fi
}

# The release rtrs and rtrs-perf that the test command's scripts run, with the
# rdma backend: one build for all of them. Another package set or feature set
# compiles rtrs-poll again and fat-LTO-links both binaries again (a minute or
# two each on 2 cores). Installs TEST_PACKAGES first (rdma-sys links libibverbs).
build_bins() {
  ensure_packages "${TEST_PACKAGES[@]}"
  cargo build --release -q --features rdma -p rtrs-cli -p rtrs-perf
}

# The directory of the rtrs and rtrs-perf a script runs: DIR when given (no
# build), else build_bins' target/release.
bin_dir() { # [DIR]
  if [ -n "${1:-}" ]; then
    echo "$1"
  else
    build_bins >&2 || return # errexit does not reach into $(...)
    echo "$PWD/target/release"
  fi
}

# Tools a script cannot run without, each its Debian package's name: installed
# when root (not in the VM's guest, whose / is the host's, read-only), the
# script skipped when one is still missing.
need_tools() { # TOOL...
  local t
  [ -n "${RTRS_GUEST:-}" ] || ensure_packages "$@"
  for t in "$@"; do command -v "$t" >/dev/null || skip "$t unavailable"; done
}

# Wall-clock seconds with milliseconds, for the scripts' timelines.
now() { date +%s.%3N; }

# The toolchain comes from rustup; make sure fmt and clippy are there.
ensure_rust() {
  command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }
  if command -v rustup >/dev/null; then
    for c in rustfmt clippy; do
      rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
  fi
}

# Reserve 2 MiB hugepages for the mempool when root (best effort).
reserve_hugepages() {
  local want=${1:-512} f=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
  [ -w "$f" ] || { echo "note: cannot reserve hugepages (not root): the mempool falls back to 4 KiB pages" >&2; return 0; }
  local have; have=$(cat "$f")
  if [ "$have" -lt "$want" ]; then echo "$want" > "$f" || true; fi
  echo "hugepages reserved: $(cat "$f") x 2 MiB"
}

# Stops a process we started, by its PID: TERM, then KILL after 5 s; waits for it.
stop_pid() {
  local p=$1
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}

# A virtualenv in DIR with the Python HdrHistogram package (pip: hdrhistogram);
# prints its python. Fails (with a note) when it cannot be had: no venv module,
# or offline.
ensure_python_hdrhistogram() {
  local dir=$1
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import hdrh' 2>/dev/null; then
    echo "$dir/bin/python"; return 0
  fi
  if ! python3 -m venv "$dir" >/dev/null 2>&1; then
    echo "note: python3 -m venv does not work here (python3-venv missing?)" >&2; return 1
  fi
  if ! timeout 120 "$dir/bin/pip" install -q hdrhistogram >/dev/null 2>&1; then
    echo "note: pip install hdrhistogram failed (offline?)" >&2; return 1
  fi
  echo "$dir/bin/python"
}

# Runs GUEST_SCRIPT in the VM (scripts/vm.sh) with VARS exported first
# (a line of shell: `export BIN=... SECS=...`); the temporary copy is
# removed afterwards. Exit status: the guest script's.
run_in_vm() { # VARS GUEST_SCRIPT
  local guest rc=0
  guest=$(mktemp /tmp/rtrs-guest.XXXXXX.sh)
  { echo "$1"; cat "$2"; } > "$guest"
  chmod 644 "$guest"
  scripts/vm.sh "$guest" || rc=$?
  rm -f "$guest"
  return $rc
}

# --- rtrs serve and rtrs-perf clients of the churn, storm, crowd and soak scripts ---

# A free tcp port on 127.0.0.1 (the kernel's pick; free when this returns).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts `BIN/rtrs serve ARGS` with its control socket at SOCK in the
# background (stderr appended to LOG), sets SRV_PID, and returns once the
# socket answers (the listeners are up by then). A server that exits first
# fails it, with its log's tail.
# With SERVE_IN set (an array, e.g. (ip netns exec NS)), the server runs
# under it (a command that execs, so that SRV_PID is the server's).
serve_start() { # BIN SOCK LOG ARGS...
  local bin=$1 sock=$2 log=$3
  shift 3
  ${SERVE_IN[@]+"${SERVE_IN[@]}"} "$bin/rtrs" serve --ctl "$sock" "$@" 2>>"$log" &
  SRV_PID=$!
  for _ in $(seq 400); do
    if "$bin/rtrs" ctl --socket "$sock" list sessions >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$SRV_PID" 2>/dev/null; then
      tail -20 "$log" >&2
      SRV_PID=
      return 1
    fi
    sleep 0.05
  done
  echo "rtrs serve did not answer on $sock" >&2
  return 1
}

# The census of the process behind control socket SOCK (`rtrs ctl stats`:
# descriptors, memory, hugepages, fabric objects), one JSON line, with the
# server's sessions, chunk memory and refusals beside it when it is one.
census_json() { # BIN SOCK
  "$1/rtrs" ctl --json --socket "$2" stats |
    jq -c '.data | .census + {sessions: ((.sessions // []) | length),
      chunk_memory: (.chunk_memory // 0), refused: (.refused_total // 0)}'
}

# Waits up to SECS for FILE to appear while PID lives; fails otherwise.
wait_ready() { # FILE PID SECS
  local i
  for ((i = 0; i < $3 * 20; i++)); do
    [ -e "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Takes the census behind SOCK into OUT once its descriptors and fabric
# objects are back to those of BASE (a census file), or after SECS: a path
# torn down is freed once its cores let go of it, which an idle-scheduled
# core on a busy host may do seconds later.
# The census of an idle server into OUT: once it has no session and its
# descriptors and fabric objects read the same twice 0.5 s apart (a closed
# session's connections are freed on its control thread after it closed),
# at most SECS.
census_idle() { # BIN SOCK OUT SECS
  local i last=
  for ((i = 0; i < $4 * 2; i++)); do
    census_json "$1" "$2" >"$3"
    local now
    now=$(jq -c '[.sessions, .fds, .fabric]' "$3")
    [ "$(jq '.sessions' "$3")" = 0 ] && [ "$now" = "$last" ] && return 0
    last=$now
    sleep 0.5
  done
  return 0
}

census_settled() { # BIN SOCK BASE OUT SECS
  local i want
  want=$(jq -c '[.fds, .fabric]' "$3")
  for ((i = 0; i < $5 * 5; i++)); do
    census_json "$1" "$2" >"$4"
    [ "$(jq -c '[.fds, .fabric]' "$4")" = "$want" ] && return 0
    sleep 0.2
  done
  return 0
}

# --- two network namespaces joined by two veth links (faults.sh, soak.sh) ---
# The caller sets TAG (a short prefix of the links' names), NS_C and NS_S
# (the client's and the server's namespace) and calls teardown_net when
# done (its cleanup trap). Link L is 10.77.L.1 (client) -- 10.77.L.2 (server).

in_c() { ip netns exec "$NS_C" "$@"; }
in_s() { ip netns exec "$NS_S" "$@"; }

# Deletes both namespaces (and their links), those that exist.
teardown_net() {
  ip netns del "$NS_C" 2>/dev/null || true
  ip netns del "$NS_S" 2>/dev/null || true
}

setup_net() {
  ip netns add "$NS_C"
  ip netns add "$NS_S"
  in_c ip link set lo up
  in_s ip link set lo up
  local l
  for l in 1 2; do
    ip link add "${TAG}c$l" netns "$NS_C" type veth peer name "${TAG}s$l" netns "$NS_S"
    in_c ip addr add "10.77.$l.1/24" dev "${TAG}c$l"
    in_s ip addr add "10.77.$l.2/24" dev "${TAG}s$l"
    in_c ip link set "${TAG}c$l" up
    in_s ip link set "${TAG}s$l" up
  done
}

# A silent cut: every packet on the link is dropped at both ends.
link_cut() { # link
  in_c tc qdisc add dev "${TAG}c$1" root tbf rate 8bit burst 1 limit 1
  in_s tc qdisc add dev "${TAG}s$1" root tbf rate 8bit burst 1 limit 1
}
link_restore() { # link
  in_c tc qdisc del dev "${TAG}c$1" root
  in_s tc qdisc del dev "${TAG}s$1" root
}

