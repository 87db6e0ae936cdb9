#!/usr/bin/env bash
# Checks scripts/deploy/reserve-hugepages.sh on a fake sysfs and /etc (part
# of the test command): the count is written and read back, the boot-time
# file holds it (sysctl.d for all nodes, tmpfiles.d for one node), bad
# arguments exit 2, a missing node exits 1 and writes nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d /tmp/rtrs-hp.XXXXXX)
trap 'rm -rf "$work"' EXIT
s=scripts/deploy/reserve-hugepages.sh
fail() { echo "check-hugepages: $*" >&2; exit 1; }
export SYSFS=$work/sys SYSCTL_D=$work/sysctl.d TMPFILES_D=$work/tmpfiles.d
mkdir -p "$SYSFS/kernel/mm/hugepages/hugepages-2048kB" "$SYSFS/devices/system/node/node1/hugepages/hugepages-2048kB"
echo 0 >"$SYSFS/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
echo 0 >"$SYSFS/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"

out=$("$s" 1024)
[ "$(cat "$SYSFS/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")" = 1024 ] || fail "count not written"
grep -qx 'vm.nr_hugepages = 1024' "$SYSCTL_D/80-rtrs-hugepages.conf" || fail "no sysctl.d line"
grep -q '0 -> 1024' <<<"$out" || fail "no before/after line: $out"

"$s" 64 --node 1 >/dev/null
[ "$(cat "$SYSFS/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages")" = 64 ] || fail "node count not written"
grep -q 'node1/hugepages/hugepages-2048kB/nr_hugepages - - - - 64$' "$TMPFILES_D/80-rtrs-hugepages.conf" || fail "no tmpfiles.d line"

rm -rf "$SYSCTL_D"
"$s" 8 --no-persist >/dev/null
[ ! -e "$SYSCTL_D" ] || fail "--no-persist wrote a boot file"

for bad in "x" "-1" "8 --node x" "8 --bogus" ""; do
  set +e
  # shellcheck disable=SC2086
  "$s" $bad >/dev/null 2>&1
  rc=$?
  set -e
  [ "$rc" = 2 ] || fail "'$bad' exited $rc, not 2"
done
set +e
"$s" 8 --node 7 >/dev/null 2>"$work/err"
rc=$?
set -e
if [ "$rc" != 1 ] || ! grep -q "no such NUMA node" "$work/err"; then
  fail "a missing node: rc $rc, $(cat "$work/err")"
fi
echo "reserve-hugepages.sh: OK (write and read back, sysctl.d, tmpfiles.d per node, bad arguments)"
