#!/usr/bin/env bash
# shellcheck disable=SC2317 # helpers run through traps
# The hostile-peer suite (issue 10, docs/security.md "Hostile peers"): an
# `rtrs serve` over tcp (RNBD export ram0, one data core on cpu 0) in a
# server namespace with two veth links, one to a well-behaved client's
# namespace (10.78.1.0/24) and one to an attacker's (10.78.2.0/24). For each
# attack, `rtrs-perf hostile` attacks from the attacker's namespace while the
# good client (`rtrs-perf client --rnbd-device ram0 --rw randrw --verify
# --iodepth 1`, cpu 1) measures, alternately alone and under the attack, in
# the same run. An attack passes when the server stays up and still serves,
# the good client has no failed IO and no verify mismatch, the attacker got
# nothing it must not (no breach), and the good client's IOPS under the
# attack are >= 0.8x alone. Needs root; exit 77 when it cannot run here.
#
#   scripts/hostile.sh [ATTACK...]     default: all (see ATTACKS below)
#   env: HOSTILE_SECS    seconds per measurement (3)
#        HOSTILE_ROUNDS  alone/attack pairs per attack (2)
#        HOSTILE_TABLE   a file the markdown table is written to
#        HOSTILE_DOC     before|after: also put the table in docs/security.md
#                        (between its hostile:before or hostile:after marks)
#        HOSTILE_PENDING attacks whose defence has not landed: their failure
#                        is reported (XFAIL) but does not fail the script
#        HOSTILE_STRICT  1: pending attacks, and IOPS under attack below
#                        0.8x alone, fail the script too (a figure, not a
#                        test, otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need_root "network namespaces, veth"
ensure_packages iproute2 python3 util-linux
for t in ip python3 taskset prlimit; do
  command -v "$t" >/dev/null || skip "$t unavailable"
done
if [ "$(nproc)" -lt 2 ]; then
  skip "needs 2 CPUs (server core and client core)"
fi

ALL=(garbage truncated oversized cm-fuzz squat conn-flood idle-flood slowloris
  emfile ro-write outside-allow no-key wrong-key)
# Attacks whose defence has not landed (none today).
PENDING=" ${HOSTILE_PENDING-} "
SECS=${HOSTILE_SECS:-3}
ROUNDS=${HOSTILE_ROUNDS:-2}
TABLE=${HOSTILE_TABLE:-}
DOC=${HOSTILE_DOC:-}
STRICT=${HOSTILE_STRICT:-0}
case "$DOC" in ""|before|after) ;; *) echo "HOSTILE_DOC must be before or after" >&2; exit 2 ;; esac

step "build the release binaries"
build_bins
RTRS=$PWD/target/release/rtrs
PERF=$PWD/target/release/rtrs-perf

TAG=rh$$
NS_S=$TAG-s
NS_G=$TAG-g
NS_A=$TAG-a
WORK=$(mktemp -d /tmp/rtrs-hostile.XXXXXX)
PORT=17900
SRV_PID=
ATK_PID=
GOOD_KEY=
# Pre-shared keys for the key attacks: the listener's, and another.
(umask 077
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/good.key"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/wrong.key")

cleanup() {
  stop_pid "$ATK_PID"
  stop_pid "$SRV_PID"
  for n in "$NS_A" "$NS_G" "$NS_S"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setup_net() {
  local n
  for n in "$NS_S" "$NS_G" "$NS_A"; do
    ip netns add "$n"
    ip netns exec "$n" ip link set lo up
  done
  ip link add "${TAG}g" netns "$NS_G" type veth peer name "${TAG}sg" netns "$NS_S"
  ip link add "${TAG}a" netns "$NS_A" type veth peer name "${TAG}sa" netns "$NS_S"
  ip netns exec "$NS_G" ip addr add 10.78.1.1/24 dev "${TAG}g"
  ip netns exec "$NS_S" ip addr add 10.78.1.2/24 dev "${TAG}sg"
  ip netns exec "$NS_A" ip addr add 10.78.2.1/24 dev "${TAG}a"
  ip netns exec "$NS_S" ip addr add 10.78.2.2/24 dev "${TAG}sa"
  ip netns exec "$NS_G" ip link set "${TAG}g" up
  ip netns exec "$NS_S" ip link set "${TAG}sg" up
  ip netns exec "$NS_A" ip link set "${TAG}a" up
  ip netns exec "$NS_S" ip link set "${TAG}sa" up
}

start_server() { # allow-list [prlimit-nofile] [key-file]
  local allow=$1 nofile=${2:-} key=${3:-}
  local pre=() auth=()
  [ -z "$key" ] || auth=(--auth-key "$key")
  [ -z "$nofile" ] || pre=(prlimit "--nofile=$nofile:$nofile")
  PORT=$((PORT + 1))
  : >"$WORK/server.log"
  # `ip netns exec`, prlimit and taskset exec: $! is the server's PID.
  ip netns exec "$NS_S" "${pre[@]}" taskset -c 0 "$RTRS" serve \
    --listen "tcp:10.78.1.2:$PORT,tcp:10.78.2.2:$PORT" --export ram0=ram:64M \
    --cores 0 --queue-depth 128 --allow "$allow" "${auth[@]}" 2>>"$WORK/server.log" &
  SRV_PID=$!
  for _ in $(seq 100); do
    if ip netns exec "$NS_S" ss -ltn 2>/dev/null | grep -q "10.78.2.2:$PORT"; then return 0; fi
    kill -0 "$SRV_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; return 1; }
    sleep 0.1
  done
  echo "the server did not listen" >&2
  return 1
}

good() { # runtime out.json -> the good client's run (its status is in the JSON file's .rc)
  local rc=0 auth=()
  [ -z "$GOOD_KEY" ] || auth=(--auth-key "$GOOD_KEY")
  ip netns exec "$NS_G" "$PERF" client --connect "tcp:10.78.1.2:$PORT" --rnbd-device ram0 "${auth[@]}" \
    --rw randrw --verify --bs 4k --iodepth 1 --size 64M --cores 1 --runtime "$1" \
    --connect-timeout 5 --json >"$2" 2>"$2.log" || rc=$?
  echo "$rc" >"$2.rc"
}

# The attack's arguments: name -> hostile flags (the emfile case floods
# silent connections).
attack_args() {
  case $1 in
    garbage|truncated|oversized|cm-fuzz) echo "--attack $1 --rate 50 --count 100" ;;
    squat) echo "--attack squat --count 64" ;;
    conn-flood) echo "--attack conn-flood --count 1000" ;;
    idle-flood) echo "--attack idle-flood --count 16 --cons 64" ;;
    slowloris) echo "--attack slowloris --count 200" ;;
    emfile) echo "--attack conn-flood --count 400" ;;
    ro-write) echo "--attack ro-write --rate 100" ;;
    outside-allow) echo "--attack outside-allow --rate 20" ;;
    no-key) echo "--attack no-key --rate 20" ;;
    wrong-key) echo "--attack wrong-key --rate 20 --auth-key $WORK/wrong.key" ;;
  esac
}

start_attack() { # name out.json
  rm -f "$WORK/ready" "$WORK/stop"
  # shellcheck disable=SC2046 # the flags split on purpose
  ip netns exec "$NS_A" "$PERF" hostile --target "tcp:10.78.2.2:$PORT" $(attack_args "$1") \
    --secs 120 --ready "$WORK/ready" --stop-file "$WORK/stop" --json >"$2" 2>"$2.log" &
  ATK_PID=$!
  for _ in $(seq 600); do
    [ -e "$WORK/ready" ] && return 0
    kill -0 "$ATK_PID" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "the attack was not in place after 60 s; measuring anyway" >&2
}

stop_attack() {
  touch "$WORK/stop"
  for _ in $(seq 300); do kill -0 "$ATK_PID" 2>/dev/null || break; sleep 0.1; done
  stop_pid "$ATK_PID"
  ATK_PID=
}

# CPU seconds (user + system) of each of the server's threads: "tid comm secs".
thread_cpu() {
  local hz t
  hz=$(getconf CLK_TCK)
  for t in /proc/"$SRV_PID"/task/*; do
    [ -r "$t/stat" ] || continue
    awk -v hz="$hz" -v tid="${t##*/}" '{
      s = $0; sub(/^[^)]*\) /, "", s); split(s, f, " ");
      c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c);
      printf "%s %s %.2f\n", tid, c, (f[12] + f[13]) / hz }' "$t/stat"
  done
}

run_attack() { # name -> results in $WORK/$name/
  local a=$1 d="$WORK/$1" r allow="10.78.1.0/24,10.78.2.0/24" nofile=
  mkdir -p "$d"
  [ "$a" != outside-allow ] || allow="10.78.1.0/24"
  [ "$a" != emfile ] || nofile=256
  # The key attacks meet a listener with a pre-shared key (the good client
  # holds it).
  GOOD_KEY=
  case $a in no-key|wrong-key) GOOD_KEY=$WORK/good.key ;; esac
  start_server "$allow" "$nofile" "$GOOD_KEY" || { echo "server did not start" >"$d/fail"; return 0; }
  for r in $(seq "$ROUNDS"); do
    good "$SECS" "$d/alone$r.json"
    if [ "$a" = emfile ]; then
      # A client already connected keeps its IO while the flood exhausts
      # the server's descriptors (--nofile 256); a new one after the flood
      # is served ("after" below).
      thread_cpu >"$d/cpu0.$r"
      date +%s.%N >"$d/t0.$r"
      good "$SECS" "$d/attack$r.json" &
      local gp=$!
      sleep 1
      start_attack emfile "$d/hostile$r.json"
      wait "$gp" || true
      thread_cpu >"$d/cpu1.$r"
      date +%s.%N >"$d/t1.$r"
      stop_attack
    else
      start_attack "$a" "$d/hostile$r.json"
      good "$SECS" "$d/attack$r.json"
      stop_attack
    fi
    kill -0 "$SRV_PID" 2>/dev/null || break
  done
  # Still serving a new client once the attack is over.
  if kill -0 "$SRV_PID" 2>/dev/null; then
    echo alive >"$d/alive"
    good 1 "$d/after.json"
  fi
  stop_pid "$SRV_PID"
  SRV_PID=
  cp "$WORK/server.log" "$d/server.log"
}

# Judges every attack and prints (and writes) the table.
judge() {
  python3 - "$WORK" "$ROUNDS" "$PENDING" "$STRICT" "$TABLE" "$DOC" "$@" <<'EOF'
import json, os, sys, subprocess, datetime
work, rounds, pending, strict, table, doc = sys.argv[1:7]
attacks = sys.argv[7:]
rounds, strict, pending = int(rounds), strict == "1", pending.split()

def load(p):
    try:
        s = json.loads(open(p).read().strip().splitlines()[-1])
    except Exception:
        s = None
    rc = int(open(p + ".rc").read()) if os.path.exists(p + ".rc") else -1
    return s, rc

def tail(p, n=600):
    try:
        return open(p).read()[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""

rows, failed, results = [], False, {}
for a in attacks:
    d = os.path.join(work, a)
    why = []
    if os.path.exists(os.path.join(d, "fail")):
        why.append("the server did not start")
    alone, under = [], []
    for r in range(1, rounds + 1):
        for kind, acc in (("alone", alone), ("attack", under)):
            p = os.path.join(d, f"{kind}{r}.json")
            if not os.path.exists(p + ".rc"):
                continue
            s, rc = load(p)
            label = "alone" if kind == "alone" else "under attack"
            if s is None:
                why.append(f"the good client failed {label} (rc {rc}: {tail(p + '.log', 200)})")
                continue
            acc.append(s["iops"])
            if s["errors"] or s["verify_failures"] or rc != 0:
                why.append(f"the good client {label}: {s['errors']} errors {s['errors_by_errno']}, "
                           f"{s['verify_failures']} verify mismatches, rc {rc}")
    if not os.path.exists(os.path.join(d, "alive")):
        why.append("the server died")
    else:
        s, rc = load(os.path.join(d, "after.json"))
        if s is None or s["errors"] or rc != 0:
            why.append("the server did not serve a new client after the attack")
    saw, breaches, notes = [], 0, []
    for r in range(1, rounds + 1):
        p = os.path.join(d, f"hostile{r}.json")
        h, _ = load(p)
        if h is None:
            if os.path.exists(p):
                why.append(f"the attacker failed: {tail(p + '.log', 200)}")
            continue
        breaches += h["breaches"]
        if r == 1:
            top = sorted(h["seen"].items(), key=lambda kv: -kv[1])
            saw = [f"{n} {k}" for k, n in top[:4]] + (["..."] if len(top) > 4 else [])
            saw.insert(0, f"{h['made']} made")
            notes = [n for n in h["notes"] if not n.startswith("per field")]
    if breaches:
        why.append(f"{breaches} breaches (the attacker got what it must not)")
    na = any(n.startswith("not applicable") for n in notes)
    print(f"{a}: IOPS alone {[round(x) for x in alone]}, under attack {[round(x) for x in under]}")
    ia = sum(alone) / len(alone) if alone else 0.0
    iu = sum(under) / len(under) if under else 0.0
    ratio = iu / ia if ia else 0.0
    # The speed goal is a figure, not a test: on two shared vCPUs one
    # 3 s pair can swing past it either way. Below the goal is reported
    # (and fails only with HOSTILE_STRICT=1); the docs table takes the
    # mean of two rounds.
    slow = ""
    if alone and under and ratio < 0.8:
        slow = f"below the goal: IOPS under attack {ratio:.2f}x alone (goal >= 0.8x)"
        if strict:
            why.append(slow)
    if not under:
        why.append("no measurement under attack")
    extra = ""
    if a == "emfile":
        log = open(os.path.join(d, "server.log")).read() if os.path.exists(os.path.join(d, "server.log")) else ""
        # The episode's own line, once per episode (a flood is one, or a
        # few when descriptors free up in between); the refusals it causes
        # are logged at most once a second. A spin would log thousands.
        emf = sum(1 for l in log.splitlines() if "out of file descriptors" in l)
        busy, spin = [], False
        for r in range(1, rounds + 1):
            try:
                window = float(open(os.path.join(d, f"t1.{r}")).read()) - float(open(os.path.join(d, f"t0.{r}")).read())
                c0 = {l.split()[0]: (l.split()[1], float(l.split()[2])) for l in open(os.path.join(d, f"cpu0.{r}"))}
                c1 = {l.split()[0]: (l.split()[1], float(l.split()[2])) for l in open(os.path.join(d, f"cpu1.{r}"))}
            except OSError:
                continue
            for tid, (comm, t1) in c1.items():
                dt = t1 - c0.get(tid, (comm, 0.0))[1]
                if dt > 0.05:
                    busy.append(f"{comm} {dt:.1f}s")
                # The data core busy-polls by design; any other thread
                # busy for a quarter of the window spins (accept4 on
                # EMFILE); the whole server is on cpu 0 (taskset), so the
                # control thread shares it with the core.
                if not comm.startswith("rtrs-core") and dt > 0.25 * window:
                    spin = True
                    why.append(f"{comm} used {dt:.1f} s of CPU in {window:.1f} s of flood (a spin)")
        extra = f"; server log lines about EMFILE: {emf}; server threads' CPU over each flood: {', '.join(busy) or 'none'}"
        if emf > 5 * rounds:
            why.append(f"EMFILE logged {emf} times in {rounds} floods (a spin, not once an episode)")
        if emf == 0:
            why.append("EMFILE never logged")
    if na and not why:
        verdict = "n/a (server has no auth)"
    elif not why:
        verdict = "XPASS (pending: drop it from PENDING)" if a in pending else "PASS"
        if slow:
            verdict += f" ({slow})"
    elif a in pending and not strict:
        verdict = "XFAIL (pending defence): " + "; ".join(why)
    else:
        verdict = "FAIL: " + "; ".join(why)
        failed = True
    attacker = ", ".join(saw) + ("; " + "; ".join(notes) if notes else "") + extra
    results[a] = {"alone": ia, "under": iu, "ratio": ratio, "result": verdict, "attacker": attacker}
    rows.append(f"| {a} | {ia:.0f} | {iu:.0f} | {ratio:.2f} | {verdict} | {attacker} |")

rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
head = (f"Commit `{rev}`{' (with uncommitted changes)' if dirty else ''}, "
        f"{datetime.date.today()}, `scripts/hostile.sh` ({rounds} rounds of alone / under attack, "
        "QD1 4 KiB verified randrw, IOPS the mean of the rounds):\n\n"
        "| attack | alone IOPS | under attack IOPS | ratio | result | the attacker saw |\n"
        "|---|---|---|---|---|---|\n")
text = head + "\n".join(rows) + "\n"
print("\n" + text)
if table:
    open(table, "w").write(text)
if doc:
    path = "docs/security.md"
    md = open(path).read()
    b, e = f"<!-- hostile:{doc} -->", f"<!-- /hostile:{doc} -->"
    if b in md and e in md:
        pre, rest = md.split(b, 1)
        _, post = rest.split(e, 1)
        data = f"<!-- data: {json.dumps(results)} -->\n"
        md = pre + b + "\n" + text + data + e + post
        # The summary: before | after, per attack, from both blocks' data.
        def data_of(which):
            blk = md.split(f"<!-- hostile:{which} -->", 1)[-1].split(f"<!-- /hostile:{which} -->", 1)[0]
            for l in blk.splitlines():
                if l.startswith("<!-- data: "):
                    return json.loads(l[len("<!-- data: "):-len(" -->")])
            return {}
        bef, aft = data_of("before"), data_of("after")
        cell = lambda r: (f"{r['under']:.0f} / {r['alone']:.0f} = {r['ratio']:.2f}x, "
                          f"{r['result'].split(':')[0]}") if r else "not run"
        names = list(dict.fromkeys(list(bef) + list(aft)))
        summ = ("| attack | before: under attack / alone IOPS | after: under attack / alone IOPS |\n"
                "|---|---|---|\n" + "\n".join(f"| {n} | {cell(bef.get(n))} | {cell(aft.get(n))} |" for n in names) + "\n")
        sb, se = "<!-- hostile:summary -->", "<!-- /hostile:summary -->"
        if sb in md and se in md:
            pre, rest = md.split(sb, 1)
            _, post = rest.split(se, 1)
            md = pre + sb + "\n" + summ + se + post
        open(path, "w").write(md)
        print(f"{path}: the {doc} table and the summary are updated")
    else:
        print(f"{path} has no {b} ... {e} marks: not updated", file=sys.stderr)
sys.exit(1 if failed else 0)
EOF
}

setup_net
attacks=("$@")
[ ${#attacks[@]} -gt 0 ] || attacks=("${ALL[@]}")
for a in "${attacks[@]}"; do
  case " ${ALL[*]} " in *" $a "*) ;; *) echo "hostile.sh: no attack $a (have: ${ALL[*]})" >&2; exit 2 ;; esac
done
for a in "${attacks[@]}"; do
  step "attack: $a"
  # In this shell (not a subshell), so the trap sees every PID.
  run_attack "$a"
  for f in "$WORK/$a"/hostile*.json; do
    [ -e "$f" ] && tail -n1 "$f"
  done
done
step "hostile peers: the good client alone and under each attack"
judge "${attacks[@]}"
