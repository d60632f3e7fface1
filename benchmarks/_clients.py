"""scale.py's idle clients: one process holding its share of the N connections.

    python benchmarks/_clients.py PORT --first I [--per-address 20000]

Reads commands on stdin, one a line, and answers each with a JSON line:

* ``open K``: open K more connections to 127.0.0.1:PORT, blocking, one after
  the other; answers ``{"event": "opened", "count": total, "seconds": s}``.
* ``check``: send a line on an even sample of its connections (up to
  ``--sample``) and read it back; answers ``{"event": "checked", "count": n}``.
* ``quit``: close every connection with a reset (SO_LINGER 0: no TIME_WAIT
  left behind), answer ``{"event": "closed"}`` and exit.

Connection number ``i`` of the whole run (``--first`` is this process's
first) is made from the source address 127.0.0.(2 + i // per-address): one
address and one destination give at most the ephemeral port range
(``/proc/sys/net/ipv4/ip_local_port_range``, about 28,000 ports), and all of
127/8 is loopback on Linux. The socket is bound to its address with
IP_BIND_ADDRESS_NO_PORT, so that the port is chosen at ``connect`` (unique per
4-tuple), not at ``bind``. 127.0.0.1 is left to the probes and to the rest of
the machine.

RLIMIT_NOFILE is raised to the hard limit first (scale.py raised the hard
limit for it, if it had to).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

import _common

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2


def source_address(index: int, per_address: int) -> str:
    """The source address of connection ``index`` of the run (127.0.0.2 onwards)."""
    n = 2 + index // per_address
    if n >= 1 << 24:
        raise ValueError(f"connection {index}: no more loopback addresses")
    return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def connect(port: int, source: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # an older kernel: the port is chosen at bind, the range is the same
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def check(clients: list[socket.socket], sample: int) -> int:
    """Send a line on an even sample of ``clients`` and read it back; return how many."""
    step = max(1, len(clients) // max(1, sample))
    chosen = clients[::step][:sample]
    for i, client in enumerate(chosen):
        line = f"ping {i}\n".encode()
        client.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = client.recv(4096)
            if not chunk:
                raise RuntimeError(f"connection {i} closed after the move")
            got += chunk
        if got != line:
            raise RuntimeError(f"connection {i} echoed {got!r} for {line!r}")
    return len(chosen)


def reset(clients: list[socket.socket]) -> None:
    linger = struct.pack("ii", 1, 0)
    for client in clients:
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        client.close()
    clients.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--first", type=int, default=0, help="index of this one's first connection")
    parser.add_argument("--per-address", type=int, default=20000, help="connections per source")
    parser.add_argument("--sample", type=int, default=16, help="connections checked by check")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    clients: list[socket.socket] = []
    try:
        for line in sys.stdin:
            command, *rest = line.split()
            if command == "open":
                start = time.monotonic()
                for _ in range(int(rest[0])):
                    index = args.first + len(clients)
                    source = source_address(index, args.per_address)
                    clients.append(connect(args.port, source, args.timeout))
                _common.emit("opened", count=len(clients), seconds=time.monotonic() - start)
            elif command == "check":
                _common.emit("checked", count=check(clients, args.sample))
            elif command == "quit":
                break
            else:
                raise SystemExit(f"unknown command {line!r}")
    finally:
        reset(clients)
    _common.emit("closed")
    return 0


if __name__ == "__main__":
    _common.raise_nofile()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
