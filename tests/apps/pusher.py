"""Connections fed by a task outside the service: the writer that must never lose a line.

Each connection's protocol (:class:`Feed`) numbers the lines it is sent: line
N of a connection reads ``N PID``. They are written by the *pusher*, a task of
this module that is not part of the service (it is not pickled; each process
that serves the service runs its own), every ``PUSHER_INTERVAL`` seconds to every
connection, as a price feed or a chat bridge would. A connection's count of
lines travels with its protocol, so a client sees 0, 1, 2... whichever
process wrote them.

Without ``PUSHER_POLITE=1`` the pusher knows nothing of moves: it writes whenever
its timer fires, in transit too. With it, it does what the hooks
documentation shows: the protocols' ``takeover_quiesce`` pauses it and
``takeover_resume`` / ``takeover_adopted`` restart it.

Set in the environment, so that a recipient (``takeover take``) that loads
this script behaves the same:

* ``PUSHER_INTERVAL``: seconds between two rounds (default 0.001); each SIGUSR2
  doubles it in the process that gets it (a test whose moves a loaded machine
  keeps rolling back asks for it);
* ``PUSHER_POLITE=1``: pause the pusher through the hooks, as above;
* ``PUSHER_ON_SIGNAL=1``: no timer; each SIGUSR1 writes one line to every
  connection (the fault matrix's "write during transit" column) and prints
  ``pushed ok=N moved=M closed=C``: written, refused with
  ``ConnectionMovedError``, skipped because ``is_closing()`` was true;
* ``PUSHER_STATS=DIR``: at exit, write ``DIR/PID.json``: for each connection
  (by the client's port) the lines whose ``write()`` returned, and the
  number of writes that raised ``ConnectionMovedError``.

    python tests/apps/pusher.py --port PORT --control PATH [--secret-file PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import signal
from typing import Any

import takeover
import takeover.asyncio as aio

INTERVAL = [float(os.environ.get("PUSHER_INTERVAL", "0.001"))]  # SIGUSR2 doubles it
POLITE = os.environ.get("PUSHER_POLITE") == "1"

# Outside the service: this process's own, never pickled.
FEEDS: dict[Feed, None] = {}
WRITTEN: dict[str, int] = {}
MOVED = [0]
PAUSED = [False]
PUSHER: list[asyncio.Task[None]] = []


class Feed(asyncio.Protocol):
    """One client's feed: its transport and how many lines it was sent."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client = str(transport.get_extra_info("peername")[1])
        FEEDS[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        FEEDS.pop(self, None)

    def data_received(self, data: bytes) -> None:
        pass

    def takeover_quiesce(self) -> None:
        if POLITE:
            PAUSED[0] = True

    def takeover_resume(self) -> None:
        PAUSED[0] = False

    def takeover_adopted(self) -> None:
        # A new process: this feed is fed by its pusher from now on.
        FEEDS[self] = None
        PAUSED[0] = False
        start_pusher()


def push_once() -> tuple[int, int, int]:
    """One line to every connection; (written, moved, closed).

    ``moved``: write() raised ConnectionMovedError; ``closed``: the transport
    said is_closing() first, so nothing was written.
    """
    ok = moved = closed = 0
    for feed in list(FEEDS):
        transport = feed.transport
        assert transport is not None
        if transport.is_closing():
            FEEDS.pop(feed, None)
            closed += 1
            continue
        try:
            transport.write(f"{feed.sent} {os.getpid()}\n".encode())
        except takeover.ConnectionMovedError:
            MOVED[0] += 1
            moved += 1
            FEEDS.pop(feed, None)
            continue
        feed.sent += 1
        WRITTEN[feed.client] = WRITTEN.get(feed.client, 0) + 1
        ok += 1
    return ok, moved, closed


async def push() -> None:
    while True:
        await asyncio.sleep(INTERVAL[0])
        if not PAUSED[0]:
            push_once()


def start_pusher() -> None:
    if PUSHER:
        return
    atexit.register(write_stats)
    if os.environ.get("PUSHER_ON_SIGNAL") == "1":
        PUSHER.append(asyncio.ensure_future(asyncio.sleep(0)))

        def on_signal() -> None:
            ok, moved, closed = push_once()
            print(f"pushed ok={ok} moved={moved} closed={closed}", flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_signal)
    else:
        PUSHER.append(asyncio.ensure_future(push()))

        def slower() -> None:
            INTERVAL[0] *= 2
            print(f"pusher interval {INTERVAL[0] * 1000:g} ms", flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, slower)


def write_stats() -> None:
    where = os.environ.get("PUSHER_STATS")
    if where:
        stats: dict[str, Any] = {"written": WRITTEN, "moved": MOVED[0]}
        with open(os.path.join(where, f"{os.getpid()}.json"), "w") as f:
            json.dump(stats, f)


async def main(args: argparse.Namespace) -> None:
    server = await aio.start_server(Feed, "127.0.0.1", args.port, name="pusher")
    start_pusher()

    def ready(migration: aio.MigrationServer) -> None:
        print(f"pusher on {args.port}, control {migration.path}", flush=True)

    await aio.serve_until_moved(server, **aio.control_options(args), ready=ready)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    aio.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
