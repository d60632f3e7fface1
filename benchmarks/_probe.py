"""scale.py's probe clients: a few connections that each send a short line every
``--interval`` ms and time its echo, through a move.

    python benchmarks/_probe.py PORT [--probes 8] [--interval 1]

Prints ``{"event": "ready"}`` once every probe is connected and has had one
echo back, then probes until a line arrives on stdin, then closes its
connections with a reset and prints ``{"event": "probes", "samples": [...]}``:
one ``[due, answered]`` pair (monotonic s) per line. Each probe has one line
in flight: the next is due ``--interval`` ms after the previous one was due
(or at once, if its answer came later than that), and its latency counts from
when it was due, so a line that had to wait for a late answer counts that
wait too. Every answer is checked: the line sent, byte for byte, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--interval", type=float, default=1.0, help="ms between lines")
    args = parser.parse_args()
    interval = args.interval / 1000
    clock = time.monotonic
    sel = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", args.port)) for _ in range(args.probes)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # One echo each before "ready": every probe is accepted and served.
    for i, s in enumerate(socks):
        s.sendall(b"hello %d\n" % i)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("probe closed before ready")
            got += chunk
        s.setblocking(False)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    print(json.dumps({"event": "ready"}), flush=True)
    samples: list[list[float]] = []
    counter = [0] * len(socks)
    due = [clock() + interval * i / len(socks) for i in range(len(socks))]
    expected: list[bytes | None] = [None] * len(socks)
    buffers = [b""] * len(socks)
    running = True
    while running:
        now = clock()
        for i, s in enumerate(socks):
            if expected[i] is None and due[i] <= now:
                counter[i] += 1
                line = b"p%d %d\n" % (i, counter[i])
                s.send(line)  # a few bytes: the socket buffer takes them at once
                expected[i] = line
        waiting = [due[i] for i in range(len(socks)) if expected[i] is None]
        timeout = max(0.0, min(waiting) - clock()) if waiting else None
        for key, _ in sel.select(timeout):
            if key.data is None:
                running = False
                continue
            i = key.data
            chunk = socks[i].recv(4096)
            if not chunk:
                raise RuntimeError(f"probe {i} closed by the server")
            buffers[i] += chunk
            line = expected[i]
            if line is not None and len(buffers[i]) >= len(line):
                now = clock()
                if buffers[i][: len(line)] != line:
                    raise RuntimeError(f"probe {i} got {buffers[i]!r} for {line!r}")
                buffers[i] = buffers[i][len(line) :]
                if buffers[i]:
                    raise RuntimeError(f"probe {i} got unasked bytes {buffers[i]!r}")
                samples.append([due[i], now])
                expected[i] = None
                due[i] = max(due[i] + interval, now)
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()
    print(json.dumps({"event": "probes", "samples": samples}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
