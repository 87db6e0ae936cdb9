#!/usr/bin/env python3
"""Samples a client session's control socket (rtrs ctl's protocol) once a
second until killed: one line each, `wall-time ios errors paths-connected`
(IOs and errors summed over the paths; -1 when the socket did not answer).

   soak-sample.py SOCKET OUT
"""
import json
import socket
import sys
import time


def stats(sock):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock)
    s.sendall(b'{"v":1,"cmd":"stats"}\n')
    line = s.makefile().readline()
    s.close()
    return json.loads(line)["data"]


def main():
    sock, out = sys.argv[1], sys.argv[2]
    with open(out, "a", buffering=1) as f:
        while True:
            t = time.time()
            try:
                d = stats(sock)
                ios = sum(p["ios"] for p in d["paths"])
                errors = sum(p["errors"] for p in d["paths"])
                up = sum(p["state"] == "connected" for p in d["paths"])
            except (OSError, ValueError, KeyError):
                ios, errors, up = -1, -1, -1
            f.write(f"{t:.3f} {ios} {errors} {up}\n")
            time.sleep(max(0.0, 1.0 - (time.time() - t)))


main()
