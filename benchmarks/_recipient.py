"""The benchmark's recipient: take every service at CONTROL through the library API.

    python benchmarks/_recipient.py CONTROL

Does what ``takeover take --json`` does up to the commit, timed from inside:
connect (with HELLO), LIST, then ``RecipientSession.take`` for each service.
Prints ``{"event": "taken", ...}`` with ``Taken.summary()`` (``pause_ms`` is
the library's own figure: the originator's quiesce to this side's start on the
shared monotonic clock), the phase timestamps of this side and its timings;
then serves until a line ``quit`` arrives on stdin, and prints
``{"event": "exit", "memory": {...}}``. ``memory_before`` in the taken event
is this process's RSS before it connects, ``memory_after`` once the service
is started. It runs on asyncio's event loop, or on uvloop's with
$BENCH_LOOP=uvloop (``scale.py --loop uvloop``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sys
import time
from typing import Any, TextIO

import _common

import takeover.asyncio as takeover
from takeover._core import recipient
from takeover._core.ahead import AheadPoller
from takeover._core.protocol import Kind
from takeover.asyncio import MigratableServer

_SNAPSHOTS: list[Any] = []


def instrument(marks: dict[str, float]) -> None:
    """Record when each phase of a move ends, on the shared monotonic clock."""

    def around(owner: Any, name: str, after: str, before: str | None = None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                marks[before] = time.monotonic()
            try:
                return real(*args, **kwargs)
            finally:
                marks[after] = time.monotonic()

        setattr(owner, name, wrapper)

    around(recipient, "loads", "loads_end", "loads_start")
    if os.environ.get("BENCH_TRACEMALLOC"):  # what the load leaves alive until later

        def snapshot_after(real: Any) -> Any:
            @functools.wraps(real)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                import tracemalloc

                result = real(*args, **kwargs)
                _SNAPSHOTS.append(tracemalloc.take_snapshot())
                return result

            return wrapper

        recipient.loads = snapshot_after(recipient.loads)
    around(MigratableServer, "adopt", "adopt_end")
    around(MigratableServer, "start", "start_end", "start_start")
    around(AheadPoller, "add", "ahead_ready")  # the last batch sent ahead, registered

    real_send = takeover.AsyncioChannel.send
    real_receive = takeover.AsyncioChannel.receive
    sent = {Kind.TAKE: "take_sent", Kind.COMMITTED: "committed_sent"}
    received = {Kind.GRAPH: "graph_received", Kind.FDS: "fds_received"}

    async def send(self: Any, message: Any, fds: Any = ()) -> None:
        await real_send(self, message, fds)
        if message.kind in sent:
            marks[sent[message.kind]] = time.monotonic()

    async def receive(self: Any, timeout: float | None) -> Any:
        message = await real_receive(self, timeout)
        if message.kind is Kind.FDS and "graph_received" not in marks:
            marks["ahead_received"] = time.monotonic()  # ahead of the graph: the last wins
        elif message.kind in received:
            marks[received[message.kind]] = time.monotonic()  # FDS: the last batch wins
        return message

    takeover.AsyncioChannel.send = send  # type: ignore[method-assign]
    takeover.AsyncioChannel.receive = receive  # type: ignore[method-assign]


async def main(control: str) -> None:
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}
    instrument(marks)
    trace = os.environ.get("BENCH_TRACEMALLOC")  # a file: where live memory went
    if trace:
        import tracemalloc

        tracemalloc.start(25)
        first = tracemalloc.take_snapshot()
        blocks = sys.getallocatedblocks()
    _common.mallocstats("recipient before")
    before = _common.memory()
    # The loop's stalls (scale.py keeps those from here until the service is started).
    gaps: list[list[float]] = []
    beat = loop.create_task(_common.heartbeat(gaps))
    t0 = time.monotonic()
    session = await takeover.connect(control)
    t1 = time.monotonic()
    try:
        names = recipient.select(await session.list(), ())
        t2 = time.monotonic()
        profiler = _common.profiler()
        taken = [await session.take(name, loop) for name in names]
        t3 = time.monotonic()
        _common.save_profile(profiler, "recipient")
    finally:
        await session.close()
    beat.cancel()
    after = _common.memory()  # the service started: its connections are held here now
    _common.mallocstats("recipient after")
    if trace:
        gc.collect()
        _trace(trace, first, blocks, taken)
    for result in taken:
        _common.emit(
            "taken",
            **result.summary(),
            connect_ms=(t1 - t0) * 1000,
            list_ms=(t2 - t1) * 1000,
            take_ms=(t3 - t2) * 1000,
            total_ms=(t3 - t0) * 1000,
            started=t0,
            marks=marks,
            memory_before=before,
            memory_after=after,
            loop=_common.loop_name(),
            gaps=gaps,
        )
    await loop.run_in_executor(None, sys.stdin.readline)
    _common.emit("exit", memory=_common.memory())
    for result in taken:
        service: Any = result.service
        service.close()


def _trace(path: str, first: Any, blocks: int, taken: list[Any]) -> None:
    """Write where the live memory allocated since ``first`` went, by traceback."""
    import tracemalloc

    second = tracemalloc.take_snapshot()
    connections = sum(t.connections for t in taken) or 1
    with open(path, "w") as out:
        current, peak = tracemalloc.get_traced_memory()
        grown = sys.getallocatedblocks() - blocks
        print(f"connections {connections} traced now {current} peak {peak}", file=out)
        print(f"allocated blocks grown {grown} ({grown / connections:.2f}/conn)", file=out)
        for loaded in _SNAPSHOTS:
            stats = second.compare_to(loaded, "traceback")
            stats.sort(key=lambda s: s.size_diff)
            total = sum(s.size_diff for s in stats if s.size_diff < 0)
            freed = total / connections
            heading = f"== alive after the load, freed since: {freed:.1f} B/conn"
            _print_stats(out, heading, stats, connections, 12)
        for key in ("lineno", "traceback"):
            stats = second.compare_to(first, key)
            total = sum(s.size_diff for s in stats)
            heading = f"== by {key}: {total} B, {total / connections:.1f} B/conn"
            _print_stats(out, heading, stats, connections, 16 if key == "traceback" else None)


def _print_stats(
    out: TextIO, heading: str, stats: list[Any], connections: int, depth: int | None
) -> None:
    """``heading``, then the first 25 of ``stats`` per connection, each with the
    last ``depth`` lines of its traceback (None: its one frame as ``file:line``)."""
    print(heading, file=out)
    for stat in stats[:25]:
        print(
            f"{stat.size_diff / connections:8.1f} B/conn "
            f"{stat.count_diff / connections:6.2f} blocks/conn",
            file=out,
        )
        frames = stat.traceback.format()[-depth:] if depth is not None else [str(stat.traceback)]
        for line in frames:
            print("    " + line, file=out)


if __name__ == "__main__":
    _common.setup_process()
    _common.run(main(sys.argv[1]))
