#!/usr/bin/env bash
# Renders the systemd unit of `rtrs serve` to stdout.
#
#   RTRS=/usr/local/bin/rtrs LISTEN=tcp:10.0.0.1:1234 EXPORTS="d0=file:/dev/nvme0n1" \
#   CORES=2,3 CONTROL_CPU=0 ACCESS="--allow 10.0.0.0/8 --auth-key /etc/rtrs/key" \
#     scripts/deploy/render-unit.sh > /etc/systemd/system/rtrs-serve.service
#
# or with the settings in a file (scripts/deploy/rtrs.toml), LISTEN and
# EXPORTS then optional (given, they override the file's):
#
#   RTRS=/usr/local/bin/rtrs CONFIG=/etc/rtrs/rtrs.toml CORES=2,3 CONTROL_CPU=0 \
#     scripts/deploy/render-unit.sh > /etc/systemd/system/rtrs-serve.service
#
# EXPORTS: space-separated export specs (each becomes --export SPEC).
# CTL: the control socket (--ctl), e.g. /run/rtrs/ctl.sock (optional).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${RTRS:?the rtrs binary (absolute path)}"
: "${CORES:?poll cores, e.g. 2,3}" "${CONTROL_CPU:?the control thread CPU}"
CONFIG=${CONFIG:-} LISTEN=${LISTEN:-} EXPORTS=${EXPORTS:-} CTL=${CTL:-} ACCESS=${ACCESS:-}
if [ -z "$CONFIG" ] && { [ -z "$LISTEN" ] || [ -z "$EXPORTS" ]; }; then
  echo "give LISTEN and EXPORTS, or CONFIG (a --config file)" >&2
  exit 2
fi
for p in "$RTRS" ${CONFIG:+"$CONFIG"} ${CTL:+"$CTL"}; do
  case $p in /*) ;; *) echo "$p must be an absolute path" >&2; exit 2 ;; esac
done
if ! [[ $CORES =~ ^[0-9]+(,[0-9]+)*$ && $CONTROL_CPU =~ ^[0-9]+$ ]]; then
  echo "CORES must be a list like 2,3 and CONTROL_CPU a number" >&2
  exit 2
fi
args=""
[ -n "$CONFIG" ] && args+="--config $CONFIG "
[ -n "$LISTEN" ] && args+="--listen $LISTEN "
for e in $EXPORTS; do args+="--export $e "; done
[ -n "$CTL" ] && args+="--ctl $CTL "
what=${LISTEN:-$CONFIG}
affinity="${CORES//,/ } $CONTROL_CPU"
docs=$(cd "$here/../../docs" 2>/dev/null && pwd || echo /usr/share/doc/rtrs-poll)
sed -e "s|@RTRS@|$RTRS|g" -e "s|@WHAT@|$what|g" -e "s|@ARGS@|${args% }|g" \
  -e "s|@CORES@|$CORES|g" -e "s|@CONTROL_CPU@|$CONTROL_CPU|g" -e "s|@ACCESS@|$ACCESS|g" \
  -e "s|@AFFINITY@|$affinity|g" -e "s|@DOCS@|$docs|g" "$here/rtrs-serve.service.in"
