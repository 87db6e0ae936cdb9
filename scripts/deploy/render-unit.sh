#!/usr/bin/env bash
# Renders the systemd unit of `rtrs serve` to stdout.
#
#   RTRS=/usr/local/bin/rtrs LISTEN=tcp:10.0.0.1:1234 EXPORTS="d0=file:/dev/nvme0n1" \
#   CORES=2,3 CONTROL_CPU=0 ACCESS="--allow 10.0.0.0/8 --auth-key /etc/rtrs/key" \
#     scripts/deploy/render-unit.sh > /etc/systemd/system/rtrs-serve.service
#
# EXPORTS: space-separated export specs (each becomes --export SPEC).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${RTRS:?the rtrs binary (absolute path)}" "${LISTEN:?--listen}" "${EXPORTS:?export specs}"
: "${CORES:?poll cores, e.g. 2,3}" "${CONTROL_CPU:?the control thread CPU}"
ACCESS=${ACCESS:-}
case $RTRS in /*) ;; *) echo "RTRS must be an absolute path" >&2; exit 2 ;; esac
if ! [[ $CORES =~ ^[0-9]+(,[0-9]+)*$ && $CONTROL_CPU =~ ^[0-9]+$ ]]; then
  echo "CORES must be a list like 2,3 and CONTROL_CPU a number" >&2
  exit 2
fi
exports=""
for e in $EXPORTS; do exports+="--export $e "; done
affinity="${CORES//,/ } $CONTROL_CPU"
docs=$(cd "$here/../../docs" 2>/dev/null && pwd || echo /usr/share/doc/rtrs-poll)
sed -e "s|@RTRS@|$RTRS|g" -e "s|@LISTEN@|$LISTEN|g" -e "s|@EXPORTS@|${exports% }|g" \
  -e "s|@CORES@|$CORES|g" -e "s|@CONTROL_CPU@|$CONTROL_CPU|g" -e "s|@ACCESS@|$ACCESS|g" \
  -e "s|@AFFINITY@|$affinity|g" -e "s|@DOCS@|$docs|g" "$here/rtrs-serve.service.in"
