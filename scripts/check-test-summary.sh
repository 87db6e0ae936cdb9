#!/usr/bin/env bash
# The test command's last words (scripts/lib.sh: root_step, skip, summary):
# "all green" only when every step ran, else "PARTIAL" with each skipped step
# and the reason its script gave. Fake steps, in about a second; as root with
# setpriv, also a real script run as nobody (it must skip: needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

fails=0
check() { # NAME OUTPUT WANT_RC GOT_RC [must-contain...] -- [must-not-contain...]
  local name=$1 out=$2 want=$3 got=$4 s neg=0
  shift 4
  [ "$want" = "$got" ] || { echo "FAIL $name: exit $got, not $want"; echo "$out"; fails=$((fails + 1)); return; }
  for s in "$@"; do
    if [ "$s" = -- ]; then neg=1; continue; fi
    if [ $neg = 0 ] && ! grep -qF -- "$s" <<<"$out"; then
      echo "FAIL $name: no '$s' in:"; echo "$out"; fails=$((fails + 1)); return
    fi
    if [ $neg = 1 ] && grep -qF -- "$s" <<<"$out"; then
      echo "FAIL $name: '$s' in:"; echo "$out"; fails=$((fails + 1)); return
    fi
  done
  echo "ok   $name"
}

# A step as the test command runs it: a script of its own that sources lib.sh.
fake=$(mktemp /tmp/rtrs-fake-step.XXXXXX)
trap 'rm -f "$fake"' EXIT
cat > "$fake" <<'EOF'
source scripts/lib.sh
case $1 in
  pass) exit 0 ;;
  skip) skip "$2" ;;
  fail) exit 3 ;;
esac
EOF
run() { # STEP... (each "what=kind[=reason]") -> the summary's output; rc as its own
  bash -c '
    source scripts/lib.sh
    for s in "$@"; do
      IFS="=" read -r what kind why <<<"$s"
      root_step "$what" bash "'"$fake"'" "$kind" "$why"
    done
    summary' run "$@" 2>&1
}

set +e
out=$(run "a=pass" "b: two words=pass"); rc=$?
check "every step ran: all green" "$out" 0 $rc "== all green" -- PARTIAL
out=$(run "hist logs=pass" "link faults=skip=needs root (fake)" "vm: self-test=skip=needs root (fake)" \
  "interop=skip=qemu-system-x86_64 unavailable"); rc=$?
check "skipped steps: PARTIAL with each reason, exit 0" "$out" 0 $rc \
  "PARTIAL: 3 of 4 steps" "skipped: link faults: needs root (fake)" \
  "skipped: vm: self-test: needs root (fake)" "2 x: needs root (fake)" \
  "1 x: qemu-system-x86_64 unavailable" -- "== all green"
out=$(RTRS_REQUIRE_ALL=1 run "a=skip=needs root (fake)"); rc=$?
check "RTRS_REQUIRE_ALL=1: a partial run fails" "$out" 1 $rc "PARTIAL: 1 of 1" -- "== all green"
out=$(run "a=pass" "b=fail" "c=pass"); rc=$?
check "a failing step ends the run with its status" "$out" 3 $rc "step 'b' failed (rc 3)" -- "== all green" PARTIAL
set -e

# A real script as a user who is not root: it says why, and the summary has it.
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null &&
  setpriv --reuid=nobody --regid=nogroup --clear-groups test -r scripts/faults.sh 2>/dev/null; then
  set +e
  out=$(setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c \
    'source scripts/lib.sh; root_step "link faults" scripts/faults.sh; summary' 2>&1)
  rc=$?
  set -e
  check "scripts/faults.sh as nobody: skipped, needs root" "$out" 0 $rc \
    "faults.sh: skipped: needs root" "skipped: link faults: needs root (network namespaces, veth, tc)" -- "== all green"
else
  echo "note: not root, no setpriv, or the tree is not readable by nobody: the fake steps only"
fi

[ $fails -eq 0 ] || { echo "$fails summary checks failed"; exit 1; }
echo "the test command's summary: all checks passed"
