#!/usr/bin/env bash
# Checks the systemd unit of `rtrs serve` (part of the test command):
# renders it for the built binary, has systemd-analyze verify it where
# there is one, and then runs it the way systemd would where systemd is
# not PID 1 (a container): its ExecStart under its CPUAffinity, with a
# NOTIFY_SOCKET; it must say READY=1, serve (its --config file's exports,
# listed over its --ctl socket), say STOPPING=1 on SIGTERM and exit 0. Under a running systemd (and root) it also starts the unit for real.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

build_bins
work=$(mktemp -d /tmp/rtrs-unit.XXXXXX)
pid=
cleanup() { stop_pid "$pid"; rm -rf "$work"; }
trap cleanup EXIT
ncpu=$(nproc)
cores=$((ncpu > 1 ? 1 : 0))
name="rtrs-unit-$$"
# The unit from flags, and the one run here: from a --config file with a
# control socket.
RTRS=$PWD/target/release/rtrs LISTEN="shm:$name" EXPORTS="d0=ram:4M d1=ram:1M,ro" \
  CORES=$cores CONTROL_CPU=0 scripts/deploy/render-unit.sh >"$work/rtrs-serve-flags.service"
cat >"$work/rtrs.toml" <<EOF
ctl = "$work/ctl.sock"
[[listen]]
address = "shm:$name"
[[export]]
name = "d0"
device = "ram:4M"
[[export]]
name = "d1"
device = "ram:1M"
ro = true
EOF
RTRS=$PWD/target/release/rtrs CONFIG="$work/rtrs.toml" \
  CORES=$cores CONTROL_CPU=0 scripts/deploy/render-unit.sh >"$work/rtrs-serve-test.service"

step "systemd-analyze verify the rendered units"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$work/rtrs-serve-flags.service"
  systemd-analyze verify "$work/rtrs-serve-test.service"
else
  echo "no systemd-analyze here: skipped"
fi

if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ] && [ "$(id -u)" -eq 0 ]; then
  step "start the unit under systemd"
  cp "$work/rtrs-serve-test.service" /run/systemd/system/
  systemctl daemon-reload
  systemctl start rtrs-serve-test.service    # Type=notify: returns once READY=1
  systemctl is-active rtrs-serve-test.service
  systemctl stop rtrs-serve-test.service
  rm -f /run/systemd/system/rtrs-serve-test.service
  systemctl daemon-reload
  exit 0
fi

step "no systemd as PID 1: the unit's steps by hand (ExecStart, CPUAffinity, NOTIFY_SOCKET, SIGTERM)"
exec_start=$(sed -n 's/^ExecStart=//p' "$work/rtrs-serve-test.service")
affinity=$(sed -n 's/^CPUAffinity=//p' "$work/rtrs-serve-test.service" | tr ' ' ',')
python3 - "$work/notify" >"$work/notes" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); s.settimeout(20)
for _ in range(2):
    try:
        print(s.recv(64).decode(), flush=True)
    except socket.timeout:
        print("TIMEOUT", flush=True)
PY
listener=$!
for _ in $(seq 50); do [ -S "$work/notify" ] && break; sleep 0.1; done
# shellcheck disable=SC2086 # ExecStart's words, as systemd splits them
NOTIFY_SOCKET=$work/notify taskset -c "$affinity" $exec_start 2>"$work/log" &
pid=$!
for _ in $(seq 100); do grep -q READY=1 "$work/notes" && break; sleep 0.1; done
grep -q READY=1 "$work/notes" || { cat "$work/log" >&2; echo "no READY=1" >&2; exit 1; }
grep -q "listening on shm:$name" "$work/log"
# The control socket answers with the config's exports.
target/release/rtrs ctl --socket "$work/ctl.sock" --json list devices | grep -q '"name":"d1","read_only":true' \
  || { cat "$work/log" >&2; echo "rtrs ctl did not list the exports" >&2; exit 1; }
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
wait "$listener" || true
[ "$rc" -eq 0 ] || { cat "$work/log" >&2; echo "exit status $rc on SIGTERM" >&2; exit 1; }
grep -q STOPPING=1 "$work/notes" || { echo "no STOPPING=1" >&2; exit 1; }
echo "unit: READY=1, served (its config, its control socket), STOPPING=1 and exit 0 on SIGTERM"
