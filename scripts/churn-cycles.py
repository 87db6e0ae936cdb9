#!/usr/bin/env python3
"""Path churn over a client session's control socket (rtrs ctl's protocol:
one JSON line each way per connection): CYCLES times, `disconnect PATH`
then `reconnect PATH`, each answered once the path is down / up again. A
reconnect the server turns away because it is still closing the path's
previous round (-ECONNRESET, the kernel's rule too) is not retried here:
the client reconnects by itself after its reconnect delay, and the cycle
waits for the path to be connected. Prints one JSON line: the counts and
the time each command took.

   churn-cycles.py SOCKET PATH CYCLES
"""
import json
import socket
import sys
import time


def req(sock, cmd, **kw):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock)
    d = {"v": 1, "cmd": cmd}
    d.update(kw)
    s.sendall((json.dumps(d) + "\n").encode())
    line = s.makefile().readline()
    s.close()
    return json.loads(line)


def state(sock, path):
    r = req(sock, "list_paths")
    for p in r.get("data", {}).get("paths", []):
        if p["id"] == path:
            return p["state"]
    return None


def main():
    sock, path, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"cycles": 0, "disconnect_failed": 0, "reconnect_refused": 0,
           "reconnect_failed": 0, "not_back": 0, "errors": []}
    td, tr = [], []
    t0 = time.monotonic()
    for _ in range(cycles):
        t = time.monotonic()
        r = req(sock, "disconnect", path=path)
        td.append(time.monotonic() - t)
        if not r["ok"]:
            out["disconnect_failed"] += 1
            out["errors"].append(r.get("error"))
        t = time.monotonic()
        r = req(sock, "reconnect", path=path)
        if not r["ok"]:
            if r.get("errno") == -104:
                out["reconnect_refused"] += 1
            else:
                out["reconnect_failed"] += 1
                out["errors"].append(r.get("error"))
            deadline = time.monotonic() + 10
            while state(sock, path) != "connected" and time.monotonic() < deadline:
                time.sleep(0.005)
            if state(sock, path) != "connected":
                out["not_back"] += 1
        tr.append(time.monotonic() - t)
        out["cycles"] += 1
    out["secs"] = time.monotonic() - t0
    for name, v in (("disconnect", td), ("reconnect", tr)):
        v.sort()
        out[name + "_ms_p50"] = round(v[len(v) // 2] * 1e3, 2) if v else 0
        out[name + "_ms_max"] = round(v[-1] * 1e3, 2) if v else 0
    out["errors"] = out["errors"][:5]
    print(json.dumps(out))


main()
