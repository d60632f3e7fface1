"""Per-connection cost of a move by TCP_REPAIR (across hosts) against one by
SCM_RIGHTS (same host), for docs/crosshost.md.

Runs as root in a private network namespace of its own (it re-executes itself
under ``unshare --net``). For each size N it opens N loopback connections,
each with unread bytes waiting in both directions, and times, in one process:

* ``repair``: what a cross-host move does to the connections themselves:
  freeze (one nft table for all, TCP_REPAIR on each), checkpoint, pickle and
  unpickle the states, close the frozen sockets, rebuild each in repair mode
  (bind, sequences, connect, options, queues, window), lift the drop, leave
  repair mode. The nft command is one process per move, whatever N.
* ``scm_rights``: what a same-host move does: the descriptors sent over an
  AF_UNIX socket pair in batches of 253, received and wrapped in sockets, the
  originals closed.

Neither includes the rest of a move (the graph, the control channel, the
commit), which both kinds share; the repair path's sockets cross no network
here (loopback), and the service address's move (ip, arping) is not counted.

    python benchmarks/crosshost.py --sizes 1,10,100,1000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from takeover._core import fds as fdpass  # noqa: E402
from takeover._core import tcprepair  # noqa: E402


def connections(count: int) -> tuple[socket.socket, list[socket.socket], list[socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    clients, servers = [], []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        client.sendall(b"c" * 100)
        server.sendall(b"s" * 100)
        clients.append(client)
        servers.append(server)
    return listener, clients, servers


def by_repair(servers: list[socket.socket]) -> tuple[dict[str, float], list[socket.socket]]:
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    frozen = tcprepair.freeze(servers)
    t1 = time.perf_counter()
    states = frozen.checkpoints()
    t2 = time.perf_counter()
    states = pickle.loads(pickle.dumps(states, protocol=pickle.HIGHEST_PROTOCOL))
    t3 = time.perf_counter()
    frozen.close_sockets()
    rebuilt = [tcprepair.prepare(state) for state in states]
    t4 = time.perf_counter()
    frozen.lift()
    t5 = time.perf_counter()
    for sock, state in zip(rebuilt, states):
        tcprepair.start(sock, state)
    t6 = time.perf_counter()
    steps.update(
        freeze=t1 - t0, checkpoint=t2 - t1, pickle=t3 - t2, close_prepare=t4 - t3,
        lift=t5 - t4, start=t6 - t5, total=t6 - t0,
    )  # fmt: skip
    for sock in rebuilt:
        assert sock.recv(100) == b"c" * 100
    return steps, rebuilt


def by_scm_rights(servers: list[socket.socket]) -> tuple[dict[str, float], list[socket.socket]]:
    left, right = socket.socketpair()
    received: list[socket.socket] = []
    with left, right:
        t0 = time.perf_counter()
        for batch in fdpass.batches([s.fileno() for s in servers]):
            fdpass.send_with_fds(left, b"x", batch)
            _, fds = fdpass.recv_with_fds(right, 1)
            received.extend(socket.socket(fileno=fd) for fd in fds)
        for sock in servers:
            sock.close()
        total = time.perf_counter() - t0
    for sock in received:
        assert sock.recv(100) == b"c" * 100
    return {"total": total}, received


def measure(count: int, repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"connections": count}
    for name, move in (("repair", by_repair), ("scm_rights", by_scm_rights)):
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            listener, clients, servers = connections(count)
            steps, moved = move(servers)
            runs.append(steps)
            for sock in [listener, *clients, *moved]:
                sock.close()
        per = {step: statistics.median(run[step] for run in runs) / count * 1e6 for step in runs[0]}
        result[name] = {"per_connection_us": per}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="crosshost")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="directory")
    parser.add_argument("--command", default="python benchmarks/crosshost.py")
    args = parser.parse_args()
    if os.environ.get("TAKEOVER_BENCH_NETNS") != "1":
        tcprepair.require_capability()
        env = {**os.environ, "TAKEOVER_BENCH_NETNS": "1"}
        argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
        raise SystemExit(subprocess.call([*argv, sys.executable, *sys.argv], env=env))
    results = [measure(int(n), args.repeats) for n in args.sizes.split(",")]
    report = {
        "command": args.command,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "results": results,
    }
    path = os.path.join(args.out, f"{args.name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"{'N':>6} {'repair µs/conn':>15} {'(freeze chk pickle prep lift start)':>40} {'scm µs':>8}"
    )
    for r in results:
        rep, scm = r["repair"]["per_connection_us"], r["scm_rights"]["per_connection_us"]
        parts = " ".join(
            f"{rep[k]:.1f}"
            for k in ("freeze", "checkpoint", "pickle", "close_prepare", "lift", "start")
        )
        print(f"{r['connections']:>6} {rep['total']:>15.1f} {parts:>40} {scm['total']:>8.2f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
