"""The baselines of the side by side: a plain asyncio line echo, no takeover.

    python benchmarks/_plain_echo.py --port P [--reuseport] [--handoff PATH] [--drain S]
        [--streams]
    python benchmarks/_plain_echo.py --fd-from PATH [--handoff PATH2] [--drain S] [--streams]

The protocol is ``harness/echo.py``'s ``Echo``, which ``_echo_app.py`` serves
too and which imports nothing of takeover; with ``--streams``, the same echo
as an ``asyncio.start_server`` coroutine (``harness/echo.py``'s
``serve_lines``), as ``_echo_app.py --streams`` serves it. Prints
``{"event": "ready", "port": P, "pid": ...}`` once it accepts,
``{"event": "exit", ...}`` when it leaves.

* SIGTERM: close the listener and every connection at once, exit
  (stop-and-restart; with ``--reuseport``, the old half of an overlapped restart).
* ``--reuseport``: bind with SO_REUSEPORT, so that a second process can bind
  the same port while this one still serves.
* ``--handoff PATH``: listen on the AF_UNIX socket PATH for a successor. When
  one connects, pass it the listening socket (SCM_RIGHTS), wait for its ready
  byte, stop accepting, and drain: keep serving the connections already open
  until they close or ``--drain`` seconds have passed, then close the rest and
  exit (the model of nginx, HAProxy, Envoy and tableflip).
* ``--fd-from PATH``: the successor: receive the listening socket from the
  process at PATH instead of binding one, start accepting on it, send a byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from typing import Any

# The repository's root, for harness/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import echo


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


class Echo(echo.Echo):
    """The line echo, keeping count of the open connections (to drain them)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        OPEN.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        gone(self.transport)


async def serve_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The streams echo (``--streams``), keeping count of the open connections."""
    OPEN.add(writer.transport)
    try:
        await echo.serve_lines(reader, writer)
    finally:
        gone(writer.transport)


def gone(transport: asyncio.BaseTransport | None) -> None:
    OPEN.discard(transport)  # type: ignore[arg-type]
    if not OPEN and EMPTY is not None:
        EMPTY.set()


OPEN: set[asyncio.BaseTransport] = set()
"""The open connections: closing one's transport ends its conversation."""
EMPTY: asyncio.Event | None = None


def listener(args: argparse.Namespace) -> socket.socket:
    if args.fd_from:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            unix.connect(args.fd_from)
            _msg, fds, _flags, _addr = socket.recv_fds(unix, 16, 1)
            sock = socket.socket(fileno=fds[0])
            HANDOFF.append(unix.detach())
        return sock
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)
    return sock


HANDOFF: list[int] = []
"""The successor's end of the hand-off connection, to send its ready byte on."""


async def close_all() -> None:
    """Close every connection and wait until each is gone (its last answer written
    first), or a second at most for a client that does not read."""
    assert EMPTY is not None
    EMPTY.clear()
    for transport in list(OPEN):
        transport.close()
    if OPEN:
        try:
            await asyncio.wait_for(EMPTY.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def main(args: argparse.Namespace) -> None:
    global EMPTY
    loop = asyncio.get_running_loop()
    EMPTY = asyncio.Event()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sock = listener(args)
    server: asyncio.AbstractServer
    if args.streams:
        server = await asyncio.start_server(serve_lines, sock=sock, backlog=4096)
    else:
        server = await loop.create_server(Echo, sock=sock, backlog=4096)
    port = sock.getsockname()[1]
    handoff: socket.socket | None = None
    if args.handoff:
        handoff = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff.bind(args.handoff)
        handoff.listen(1)
        handoff.setblocking(False)
    emit("ready", port=port, pid=os.getpid())
    if HANDOFF:  # tell the predecessor that we accept now
        with socket.socket(fileno=HANDOFF.pop()) as unix:
            unix.sendall(b"r")
    waiters = [asyncio.ensure_future(stop.wait())]
    if handoff is not None:
        waiters.append(asyncio.ensure_future(loop.sock_accept(handoff)))
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        future.cancel()
    if stop.is_set():
        server.close()
        await close_all()
        emit("exit", how="terminated", pid=os.getpid())
        return
    # A successor: pass it the listener, wait for its ready byte, then drain.
    successor, _addr = next(iter(done)).result()
    successor.setblocking(True)
    socket.send_fds(successor, [b"l"], [sock.fileno()])
    successor.settimeout(60)
    await loop.run_in_executor(None, successor.recv, 1)
    successor.close()
    server.close()  # this process stops accepting; the successor's copy stays open
    started = time.monotonic()
    drained = True
    if OPEN:
        EMPTY.clear()
        try:
            await asyncio.wait_for(EMPTY.wait(), args.drain)
        except asyncio.TimeoutError:
            drained = False
    left = len(OPEN)
    await close_all()
    emit(
        "exit",
        how="drained" if drained else "drain timeout",
        closed=left,
        drain_s=time.monotonic() - started,
        pid=os.getpid(),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--handoff", help="AF_UNIX path to pass the listener on")
    parser.add_argument("--fd-from", help="AF_UNIX path to receive the listener from")
    parser.add_argument("--drain", type=float, default=2.0, help="seconds")
    parser.add_argument(
        "--streams", action="store_true", help="serve with asyncio.start_server (a coroutine)"
    )
    asyncio.run(main(parser.parse_args()))
