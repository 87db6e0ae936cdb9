#!/usr/bin/env bash
# Reserves 2 MiB hugepages for rtrs serve's chunk pool, now and at every boot
# (docs/deploy.md, section 2).
#
#   scripts/deploy/reserve-hugepages.sh PAGES [--node N] [--no-persist]
#
# Now: writes PAGES to the kernel's count (all nodes, or NUMA node N: the
# node of the NIC and the poll cores) and reads back what the kernel gave;
# fewer than asked (memory too fragmented already) is an error, with the
# figures and what to do. At boot: /etc/sysctl.d/80-rtrs-hugepages.conf
# (vm.nr_hugepages; all nodes) or, for one node, a tmpfiles.d line that
# writes the node's count. Root only. SYSFS=, SYSCTL_D=, TMPFILES_D= point
# it elsewhere (the test command runs it on a fake tree).
set -euo pipefail

usage() { echo "usage: $0 PAGES [--node N] [--no-persist]" >&2; exit 2; }
[ $# -ge 1 ] || usage
pages=$1
shift
node='' persist=1
while [ $# -gt 0 ]; do
  case $1 in
    --node) [ $# -ge 2 ] || usage; node=$2; shift 2 ;;
    --no-persist) persist=0; shift ;;
    *) usage ;;
  esac
done
[[ $pages =~ ^[0-9]+$ ]] || { echo "$0: PAGES must be a number of 2 MiB pages, not '$pages'" >&2; exit 2; }
[ -z "$node" ] || [[ $node =~ ^[0-9]+$ ]] || { echo "$0: --node takes a NUMA node number, not '$node'" >&2; exit 2; }

sysfs=${SYSFS:-/sys}
sysctl_d=${SYSCTL_D:-/etc/sysctl.d}
tmpfiles_d=${TMPFILES_D:-/etc/tmpfiles.d}
if [ -n "$node" ]; then
  f=$sysfs/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages
else
  f=$sysfs/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
fi
[ -e "$f" ] || { echo "$0: $f does not exist (no such NUMA node, or no 2 MiB hugepage support)" >&2; exit 1; }
[ -w "$f" ] || { echo "$0: cannot write $f: run as root" >&2; exit 1; }

before=$(cat "$f")
echo "$pages" >"$f"
got=$(cat "$f")
echo "hugepages${node:+ on node $node}: $before -> $got x 2 MiB (asked $pages)"

if [ "$persist" = 1 ]; then
  if [ -z "$node" ]; then
    mkdir -p "$sysctl_d"
    printf '# rtrs serve: chunk pool memory (scripts/deploy/reserve-hugepages.sh)\nvm.nr_hugepages = %s\n' \
      "$pages" >"$sysctl_d/80-rtrs-hugepages.conf"
    echo "at boot: $sysctl_d/80-rtrs-hugepages.conf"
  else
    mkdir -p "$tmpfiles_d"
    printf '# rtrs serve: chunk pool memory on NUMA node %s (scripts/deploy/reserve-hugepages.sh)\nw /sys/devices/system/node/node%s/hugepages/hugepages-2048kB/nr_hugepages - - - - %s\n' \
      "$node" "$node" "$pages" >"$tmpfiles_d/80-rtrs-hugepages.conf"
    echo "at boot: $tmpfiles_d/80-rtrs-hugepages.conf"
  fi
fi

if [ "$got" -lt "$pages" ]; then
  echo "$0: the kernel gave $got of $pages pages (memory is fragmented): reboot with the boot-time setting above, or add hugepages=$pages to the kernel command line" >&2
  exit 1
fi
