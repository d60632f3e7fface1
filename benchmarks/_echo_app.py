"""The benchmark's originator: the line echo (harness/echo.py, as examples/echo.py), instrumented.

    python benchmarks/_echo_app.py --control PATH [--port 0] [--streams [--drain SECONDS]]

It runs on asyncio's event loop, or on uvloop's with $BENCH_LOOP=uvloop
(``scale.py --loop uvloop``).

With ``--streams`` it serves the same echo as an asyncio streams
``client_connected_cb`` (``harness/echo.py``'s ``serve_lines``): a move takes
the listener, and the connections drain here for up to ``--drain`` seconds
(``start_server(..., drain=SECONDS)``), then are closed, then it exits.

Prints ``{"event": "ready", "port": P}`` once it serves, and on exit (after
its service moved away) ``{"event": "exit", "marks": {...}, "memory": {...}}``:
monotonic timestamps of the phases of the move on this side and its peak RSS.

The timing wrappers are installed in ``main()`` only: a recipient loads this
file by path to find ``Echo`` and must not patch anything.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import os
import sys
import time
from typing import Any

# The repository's root, for harness/; a recipient that loads this script runs this too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common

import takeover.asyncio as takeover
from harness import echo


class Echo(echo.Echo):
    """The line echo (harness/echo.py), as a class of this script: a recipient allows it."""


async def serve_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The streams echo (``--streams``), as a function of this script: a recipient allows it."""
    await echo.serve_lines(reader, writer)


def instrument(marks: dict[str, float]) -> None:
    """Record when each phase of a move ends, on the shared monotonic clock."""
    from takeover._core import originator
    from takeover._core.protocol import Kind
    from takeover.asyncio import MigratableServer

    def around(owner: Any, name: str, before: str | None, after: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                marks.setdefault(before, time.monotonic())
            try:
                return real(*args, **kwargs)
            finally:
                marks.setdefault(after, time.monotonic())

        @functools.wraps(real)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                marks.setdefault(before, time.monotonic())
            try:
                return await real(*args, **kwargs)
            finally:
                marks.setdefault(after, time.monotonic())

        setattr(owner, name, async_wrapper if inspect.iscoroutinefunction(real) else wrapper)

    around(MigratableServer, "quiesce", "quiesce_start", "quiesce_end")
    around(originator, "dumps", None, "dumps_end")
    around(MigratableServer, "release", "release_start", "release_end")
    around(originator._Move, "_dry_run", "dry_run_start", "dry_run_end")

    real_send = takeover.AsyncioChannel.send
    real_receive = takeover.AsyncioChannel.receive
    sent = {Kind.GRAPH: "graph_sent", Kind.FDS: "fds_sent"}
    received = {Kind.TAKE: "take_received", Kind.COMMITTED: "committed_received"}

    async def send(self: Any, message: Any, fds: Any = ()) -> None:
        await real_send(self, message, fds)
        if message.kind is Kind.FDS and "graph_sent" not in marks:
            marks["ahead_sent"] = time.monotonic()  # sent ahead of the graph: the last wins
        elif message.kind in sent:
            marks[sent[message.kind]] = time.monotonic()  # FDS: the last batch wins

    profiling: list[Any] = []

    async def receive(self: Any, timeout: float | None) -> Any:
        message = await real_receive(self, timeout)
        if message.kind in received:
            marks[received[message.kind]] = time.monotonic()
        if message.kind is Kind.TAKE:
            _common.mallocstats("originator at TAKE")
            profiling.append(_common.profiler())
        elif message.kind is Kind.COMMITTED and profiling:
            _common.save_profile(profiling.pop(), "originator")
        return message

    takeover.AsyncioChannel.send = send  # type: ignore[method-assign]
    takeover.AsyncioChannel.receive = receive  # type: ignore[method-assign]


async def main(args: argparse.Namespace) -> None:
    marks: dict[str, float] = {}
    instrument(marks)
    # The loop's stalls (scale.py keeps those from TAKE to the release).
    gaps: list[list[float]] = []
    beat = asyncio.get_running_loop().create_task(_common.heartbeat(gaps))
    if args.streams:
        server = await takeover.start_server(
            serve_lines, args.host, args.port, name="echo", backlog=4096, drain=args.drain
        )
    else:
        server = await takeover.start_server(Echo, args.host, args.port, name="echo", backlog=4096)
    port = server.sockets[0].getsockname()[1]
    await takeover.serve_until_moved(
        server,
        control=args.control,
        ready=lambda m: (
            _common.mallocstats("originator ready")
            or _common.emit("ready", port=port, nofile=list(limits), loop=_common.loop_name())
        ),
    )
    beat.cancel()
    _common.emit("exit", marks=marks, memory=_common.memory(), gaps=gaps)


if __name__ == "__main__":
    limits = _common.setup_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control", required=True)
    parser.add_argument("--streams", action="store_true", help="a client_connected_cb server")
    parser.add_argument(
        "--drain", type=float, default=None, help="with --streams: seconds (default 30)"
    )
    _common.run(main(parser.parse_args()))
