#!/usr/bin/env python3
"""The timeline of one fault case of scripts/vm-faults.sh, on the host's clock.

Reads the run directory scripts/vm2-host-fault.sh and the guests
(scripts/vm2-guest-fault.sh) filled: the host's events (host.events: "<ms>
name text"), the guests' samples as the host saw them (<vm>.seen: "<host ms>
S t=<guest epoch s> k=v ..."), the client's result (a.result), the kernel
logs (<vm>.dmesg) and the tools' stamped logs. A guest's clock is put on the
host's with the smallest (seen - t) over its samples: the sample that reached
the host fastest bounds the offset best (to about the host's 0.2 s poll).

Prints greppable lines, every one starting with "FAULT <case>":
  FAULT <case> +<s> s  <event>          the timeline, from the first IO
  FAULT <case> iops/s ...               IOs completed in each second
  FAULT <case> phase ...                IO rates before, during and after
  FAULT-RESULT case=<case> result=pass|fail k=v ...
Exit status 0 on pass, 1 on fail.

    scripts/fault-timeline.py RUN_DIR CASE RUN_SECONDS [LABEL]

LABEL (default CASE) names the case in the output, e.g. ours-server@one-link.
"""
import os
import re
import sys

CLIENT = {
    "kernel": "the kernel's rnbd-client",
    "ours-server": "the kernel's rnbd-client",
    "ours-client": "our rtrs-perf client",
}


# Kernel log lines of every boot, not of the case.
# A gap of the client guest's samples (s) that says it did not run.
STARVED_S = 10.0
NOISE = r"out-of-tree module|module verification failed|rdma_rxe: loaded|: set active|: added eth|Loading module"


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def samples(path):
    """[{'h': host s, 't': guest s, key: value}], offset (host - guest)."""
    rows = []
    for line in read(path):
        p = line.split()
        if len(p) < 3 or p[1] != "S":
            continue
        d = {"seen": int(p[0]) / 1000.0}
        for kv in p[2:]:
            k, _, v = kv.partition("=")
            d[k] = v
        try:
            d["t"] = float(d["t"])
        except (KeyError, ValueError):
            continue
        rows.append(d)
    if not rows:
        return rows, None
    off = min(r["seen"] - r["t"] for r in rows)
    for r in rows:
        r["h"] = r["t"] + off
    return rows, off


def num(r, k):
    try:
        return int(r.get(k, 0))
    except ValueError:
        return 0


def kernel_log(path, off):
    """[(host s, line)] of the rtrs/rnbd/rxe lines of a guest's dmesg."""
    lines = read(path)
    if not lines or off is None:
        return []
    m = re.match(r"clock uptime=([\d.]+) epoch=([\d.]+)", lines[0])
    if not m:
        return []
    up, ep = float(m.group(1)), float(m.group(2))
    out = []
    for line in lines[1:]:
        k = re.match(r"\[\s*([\d.]+)\]\s*(.*)", line)
        if (k and re.match(r"(rtrs_(client|server|core)|rnbd_(client|server)|rdma_rxe|infiniband rxe|virtio_net)", k.group(2))
                and not re.search(NOISE, k.group(2))):
            out.append((ep - (up - float(k.group(1))) + off, k.group(2)))
    return out


def stamped(path, off):
    """[(host s, line)] of a log whose lines are "<guest epoch s> line"."""
    out = []
    if off is None:
        return out
    for line in read(path):
        t, _, rest = line.partition(" ")
        try:
            out.append((float(t) + off, rest))
        except ValueError:
            pass
    return out


def main():
    run, case, run_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    label = sys.argv[4] if len(sys.argv) > 4 else case
    tag = f"FAULT {label}"
    ev = {}
    for line in read(os.path.join(run, "host.events")):
        ms, name, *text = line.split(" ", 2)
        ev.setdefault(name, (int(ms) / 1000.0, " ".join(text)))
    a, off_a = samples(os.path.join(run, "a.seen"))
    b, off_b = samples(os.path.join(run, "b.seen"))
    # A guest without samples (its setup failed early): the other's clock
    # offset (both guests set their clocks from the host's at boot).
    off_a = off_a if off_a is not None else off_b
    off_b = off_b if off_b is not None else off_a
    res = dict(kv.partition("=")[::2] for kv in " ".join(read(os.path.join(run, "a.result"))).split())
    fails = []
    out = {}

    # IOs over time: the client's completions (a): the kernel client's
    # /sys/block/rnbd0/stat, or our rtrs-perf's progress lines (each one
    # second's completions, exact: the same counts as its --hist intervals).
    ios_rows = a
    ios_what = "IOs completed"
    io = [r for r in ios_rows if num(r, "ios") > 0]
    if not io:
        print(f"{tag} no IO was seen (setup failed: see the log)")
        fails.append("no IO")
        t0 = ev.get("start", (0.0, ""))[0]
    else:
        t0 = io[0]["h"]
    timeline = []

    def at(t, text):
        timeline.append((t, text))

    def rel(t):
        return f"{t - t0:+.1f}"

    if io:
        at(t0, f"IO started: {CLIENT[case]}, 4 KiB QD32 verified IO over 2 paths")
    cut = ev.get("cut", (None,))[0]
    restore = ev.get("restore", (None,))[0]
    stop = ev.get("stop", (None,))[0] or (a[-1]["h"] if a else t0)
    if cut:
        at(cut, ev["cut"][1])
    if restore:
        at(restore, ev["restore"][1])
    at(stop, "IO stopped (the host's stop)")

    # Path 1 dead: the first client sample after the cut with path 1 down.
    detect = next((r["h"] for r in a if cut and r["h"] >= cut and r.get("p1") == "down"), None)
    what = "its sysfs state left connected" if case != "ours-client" else "rtrs-perf shows it not Connected"
    if detect:
        out["detect_s"] = f"{detect - cut:.1f}"
        at(detect, f"path 1 detected dead by the client: {what} ({detect - cut:.1f} s after the cut)")
    elif cut:
        fails.append("path 1 never detected dead")
    # Path 1 back: the first sample after the restore and the detection with path 1 up.
    reconn = None
    if restore and detect:
        reconn = next((r["h"] for r in a if r["h"] >= max(restore, detect) and r.get("p1") == "up"), None)
    if reconn:
        out["reconnect_s"] = f"{reconn - restore:.1f}"
        out["reconnect_after_detect_s"] = f"{reconn - detect:.1f}"
        at(reconn, f"path 1 reconnected: connected again ({reconn - restore:.1f} s after the restore, "
           f"{reconn - detect:.1f} s after the detection)")
    elif restore:
        fails.append("path 1 not reconnected")
    # Path 1 carrying IO again: its per-path count grows after the reconnect
    # (the kernel client's stats/rdma, else the kernel server's).
    src, who = (a, "the client's stats/rdma") if any("p1ios" in r for r in a) else (b, "the kernel server's stats/rdma")
    carry = None
    if reconn:
        prev = None
        for r in src:
            if r["h"] >= reconn - 0.6:
                if prev is not None and num(r, "p1ios") > prev and r.get("p1") == "up":
                    carry = r["h"]
                    break
                prev = num(r, "p1ios")
    if carry:
        out["carry_s"] = f"{carry - restore:.1f}"
        at(carry, f"path 1 carries IO again ({who} grows)")
    elif reconn:
        fails.append("path 1 carries no IO after the reconnect")

    # IO over time: completions in each second, and per phase.
    def ios_at(t):
        v = 0
        for r in ios_rows:
            if r["h"] > t:
                break
            v = num(r, "ios")
        return v

    if io:
        per_s = [ios_at(t0 + k + 1) - ios_at(t0 + k) for k in range(int(stop - t0))]
        print(f"{tag} iops/s ({ios_what} each second from +0; cut at {rel(cut) if cut else '-'}, "
              f"restore at {rel(restore) if restore else '-'}): {' '.join(map(str, per_s))}")
        marks = [("before the cut", t0, cut), ("cut -> detected", cut, detect),
                 ("detected -> restored", detect or cut, restore),
                 ("restored -> reconnected", restore, reconn), ("after the reconnect", reconn, stop)]
        parts = []
        for name, x, y in marks:
            if x is not None and y is not None and y > x:
                n = ios_at(y) - ios_at(x)
                parts.append(f"{name} {n} in {y - x:.1f} s = {n / (y - x):.0f}/s")
        print(f"{tag} phase ({ios_what}): " + "; ".join(parts))
        if cut:
            before = (ios_at(cut) - ios_at(t0)) / max(cut - t0, 0.1)
            end = restore or stop
            outage = (ios_at(end) - ios_at(cut)) / max(end - cut, 0.1)
            out["iops_before"] = f"{before:.0f}"
            out["iops_outage"] = f"{outage:.0f}"
            if ios_at(end) - ios_at(cut) == 0:
                fails.append("no IO completed while link 1 was cut")
        if reconn:
            out["iops_after"] = f"{(ios_at(stop) - ios_at(reconn)) / max(stop - reconn, 0.1):.0f}"
        # The longest stretch of samples without a completion (at least this long).
        longest, where, run_start, last = 0.0, None, None, None
        for r in ios_rows:
            if r["h"] < t0 or r["h"] > stop:
                continue
            if last is not None and num(r, "ios") == last:
                run_start = run_start if run_start is not None else prev_h
                if r["h"] - run_start > longest:
                    longest, where = r["h"] - run_start, run_start
            else:
                run_start = None
            last, prev_h = num(r, "ios"), r["h"]
        out["stall_s"] = f"{longest:.1f}"
        if where is not None:
            print(f"{tag} longest stretch without IO ({ios_what}): {longest:.1f} s from {rel(where)}")
    if cut and io:
        # IO over path 2 while path 1 is cut: completions, and what each path took.
        end = min(cut + 5, restore or stop)

        def took(path, x, y):
            """IOs submitted on a path between x and y; a count that drops
            (the kernel server's path went and came back) starts again."""
            if not any(path in r for r in src):
                return None
            n, prev = 0, None
            for r in src:
                if x <= r["h"] <= y:
                    v = num(r, path)
                    if prev is not None:
                        n += v - prev if v >= prev else v
                    prev = v
            return n

        n = ios_at(end) - ios_at(cut)
        p1, p2 = took("p1ios", cut, end), took("p2ios", cut, end)
        paths = f" (path 2 took {p2}, path 1 {p1})" if p2 is not None else ""
        at(cut + 0.01, f"IO continues over path 2: {n} {ios_what} in the {end - cut:.0f} s after the cut{paths}")
        if detect and restore:
            p1, p2 = took("p1ios", detect, restore), took("p2ios", detect, restore)
            if p2 is not None:
                print(f"{tag} while path 1 was dead (detected -> restored): path 2 took {p2} IOs, path 1 {p1}")
    if cut and any("p2fo" in r for r in a):
        fo = num(a[-1], "p2fo") - max((num(r, "p2fo") for r in a if r["h"] <= cut), default=0)
        out["failed_over"] = str(fo)
        print(f"{tag} requests failed over to path 2 (its stats/rdma failover_cnt): {fo}")
    if a and not (a[-1].get("p1") == "up" and a[-1].get("p2") == "up"):
        fails.append(f"paths at the end: p1 {a[-1].get('p1')} p2 {a[-1].get('p2')}")
    for name in ("no-detect", "no-reconnect", "no-io", "abort", "no-result", "guest-ended"):
        if name in ev:
            at(ev[name][0], "host: " + ev[name][1])

    # The guests' own words after the first IO: kernel logs, our server's log.
    logs = [(t, "[a kernel] " + x) for t, x in kernel_log(os.path.join(run, "a.dmesg"), off_a)]
    logs += [(t, "[b kernel] " + x) for t, x in kernel_log(os.path.join(run, "b.dmesg"), off_b)]
    logs += [(t, "[b rtrs serve] " + x) for t, x in stamped(os.path.join(run, "b.serve.log"), off_b)]
    logs += [(t, "[a rtrs-perf] " + x) for t, x in stamped(os.path.join(run, "a.perf.log"), off_a)
             if not re.match(r"\[\s*\d+s\]", x)]
    logs_shown = []
    # From the first IO on; a message repeated within a second is shown once, counted.
    shown, recent = {}, {}
    for t, x in sorted(logs):
        src_name = x.split("]")[0]
        if t < t0 - 1:
            continue
        if x in recent and t - recent[x][0] < 1.0:
            recent[x][2] += 1
            continue
        if shown.get(src_name, 0) < 15:
            shown[src_name] = shown.get(src_name, 0) + 1
            recent[x] = [t, x, 1]
            logs_shown.append(recent[x])
    for t, x, n in logs_shown:
        at(t, x + (f" (x{n})" if n > 1 else ""))
    # Soft-RoCE's own failure (scripts/vm-lib.sh, "vm_rxe_fix"): a
    # retransmission on a QP whose send queue holds a local operation that
    # already ran makes rxe run it again; a REG_MR then finds its key valid
    # ("not free"), and the QP stalls for good. Each device's retransmission
    # timeouts (rtN) say which link's QPs retransmitted, and when.
    retries = []
    for vm, rows in (("a", a), ("b", b)):
        for dev in ("rt1", "rt2"):
            prev = None
            for r in rows:
                if dev not in r:
                    continue
                v = num(r, dev)
                if prev is not None and v > prev and r["h"] >= t0:
                    retries.append((r["h"], vm, int(dev[2]), v - prev))
                prev = v
    bursts = []
    for t, vm, path, n in sorted(retries):
        last = next((x for x in reversed(bursts) if x[1] == vm and x[2] == path), None)
        if last and t - last[4] < 2.0:
            last[3] += n
            last[4] = t
        else:
            bursts.append([t, vm, path, n, t])
    cut_window = (cut or 0, (reconn or restore or stop) if cut else 0)
    for t, vm, path, n, _ in bursts:
        during = path == 1 and cut_window[0] <= t <= cut_window[1]
        note = " (link 1 cut: expected)" if during else ""
        at(t, f"[{vm} soft-RoCE] path {path}'s device retransmitted after a timeout ({n}x){note}")
    # A NIC that stopped sending while soft-RoCE kept handing it packets:
    # the emulated NIC's transmit queue stalled (qemu's virtio-net; the
    # guest's NETDEV WATCHDOG says so after 5 s of a full queue).
    stalls = []
    for vm, rows in (("a", a), ("b", b)):
        for dev in ("1", "2"):
            start = None
            for prev, r in zip(rows, rows[1:]):
                if "nt" + dev not in r:
                    continue
                sent = num(r, "st" + dev) - num(prev, "st" + dev)
                out_ = num(r, "nt" + dev) - num(prev, "nt" + dev)
                if sent > 0 and out_ == 0:
                    start = start or (prev["h"], num(prev, "st" + dev))
                elif out_ > 0:
                    if start and r["h"] - start[0] >= 3.0:
                        stalls.append((start[0], r["h"], vm, int(dev), num(prev, "st" + dev) - start[1]))
                    start = None
            if start and rows and rows[-1]["h"] - start[0] >= 3.0:
                stalls.append((start[0], None, vm, int(dev), num(rows[-1], "st" + dev) - start[1]))
    for t, end, vm, dev, n in stalls:
        until = f"for {end - t:.1f} s" if end else "to the end"
        at(t, f"[{vm} NIC] link {dev}'s NIC sent nothing {until} while soft-RoCE handed it {n} packets: "
              f"its transmit queue stalled (qemu's emulated NIC)")
    # A client guest that took no sample for seconds did not run at all
    # (its sampler ticks every 0.5 s; the server guest's starves beside a
    # busy poller of ours on its one vCPU, so only a's counts): the host's
    # CPUs were taken by something else, and every timer in the guests,
    # heartbeats included, fired that much late.
    starved = []
    win = [r["h"] for r in a if t0 <= r["h"] <= stop]
    for p_, q_ in zip(win, win[1:]):
        if q_ - p_ >= STARVED_S:
            starved.append((p_, q_))
            at(p_, f"[a] the client guest took no sample for {q_ - p_:.1f} s: it did not run (the host starved it)")
    watchdog = [(t, x) for t, x in logs if "NETDEV WATCHDOG" in x]
    rerun = [(t, x) for t, x in logs if "rxe_reg_fast_mr" in x and "not free" in x]
    # A re-run on a path that should be healthy: the other path any time,
    # path 1 outside its cut.
    culprit = []
    for t, x in rerun:
        near = [b_ for b_ in bursts if abs(b_[0] - t) <= 3.0]
        paths = sorted({b_[2] for b_ in near})
        in_cut = cut_window[0] <= t <= cut_window[1]
        healthy = [p for p in paths if p == 2 or not in_cut]
        if healthy or (not paths and not in_cut):
            culprit.append((t, healthy))
        else:
            at(t, "[a soft-RoCE] that REG_MR was re-run on path 1 while it was cut (harmless there)")
    for t, x in sorted(timeline, key=lambda e: e[0]):
        print(f"{tag} {rel(t)} s  {x}")

    errors = res.get("errors", "?")
    if res.get("rc") != "0" or errors != "0":
        fails.append(f"{res.get('tool', 'the client')}: rc {res.get('rc', '?')}, errors {errors}")
    verified = res.get("verified", "0")
    if verified in ("0", ""):
        fails.append("nothing verified")
    out.update(errors=errors, verified=verified, run_s=f"{run_s:.0f}")
    for k, v in res.items():  # anything the client noted besides its counts
        if k not in ("tool", "rc", "errors", "writes", "verified", "ios"):
            out[k] = v
    # What under the case can kill a healthy path, each with its evidence:
    # printed when seen, and the cause of a failure when there is one.
    findings = []
    if starved:
        t, u = max(starved, key=lambda x: x[1] - x[0])
        findings.append(("host-starved", "HOST-STARVED",
                         f"the client guest did not run for {u - t:.1f} s from {rel(t)} s (no sample; it "
                         f"samples every 0.5 s): the host's CPUs were taken, the guests' heartbeats late: "
                         f"not RTRS"))
    for t, paths in culprit:
        where = f"path {'/'.join(map(str, paths))}" if paths else "a healthy path"
        findings.append(("soft-roce", "SOFT-ROCE",
                         f"soft-RoCE re-ran a REG_MR after a retransmission on {where} at {rel(t)} s "
                         f"(rxe_reg_fast_mr: not free): that QP stops sending and never flushes"))
    # A stall of a healthy link while IO ran (one at setup is noted, not blamed).
    healthy_stall = [x for x in stalls
                     if x[0] >= t0 and (x[3] == 2 or not (cut_window[0] <= x[0] <= cut_window[1]))]
    if healthy_stall or watchdog:
        t = healthy_stall[0][0] if healthy_stall else watchdog[0][0]
        findings.append(("qemu-nic", "QEMU-NIC",
                         f"a guest's emulated NIC stopped transmitting at {rel(t)} s (its TX counter flat while "
                         f"soft-RoCE sent; NETDEV WATCHDOG lines: {len(watchdog)}): the network under the case, "
                         f"not RTRS"))
    cause = None
    for c, kind, line in findings:
        print(f"{tag} {kind} {line}")
        if fails and cause is None:
            cause = c
            fails.append(line)
    if fails and cause is None:
        cause = "rtrs" if case != "kernel" else "kernel-rtrs"
    if cause:
        out["cause"] = cause
    out["retries"] = str(sum(x[3] for x in bursts))
    verdict = "fail" if fails else "pass"
    kv = " ".join(f"{k}={v}" for k, v in out.items())
    why = f' why="{"; ".join(fails)}"' if fails else ""
    print(f"FAULT-RESULT case={label} result={verdict} {kv}{why}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
