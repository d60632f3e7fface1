"""A recipient started ahead of time: takes every service at CONTROL when told to.

    python benchmarks/_mover.py CONTROL

What ``takeover take --json CONTROL`` does, through the library API, with the
process start and the imports done before the move: prints
``{"event": "ready"}``, waits for a line ``go`` on stdin, then connects, takes
every service, publishes them again at CONTROL (rename over it, before the
conversation ends, as the command does) and prints ``{"event": "taken", ...}``
per service and ``{"event": "serving", ...}``. It serves until its services
have moved on (then exits 0) or until SIGTERM (then closes them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import _common

import takeover.asyncio as takeover
from takeover.recipient import select


async def main(control: str) -> None:
    loop = asyncio.get_running_loop()
    _common.emit("ready", pid=os.getpid())
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    session = await takeover.connect(control)
    try:
        names = select(await session.list(), ())
        taken = [await session.take(name, loop) for name in names]
        migration = takeover.MigrationServer(control, replace=True)
        for result in taken:
            migration.publish(result.service)
        await migration.start()
    finally:
        await session.close()
    for result in taken:
        _common.emit("taken", **result.summary())
    _common.emit("serving", control=migration.path, pid=os.getpid())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    waiter = asyncio.ensure_future(migration.wait_empty())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    moved_away = waiter.done() and not waiter.cancelled()
    for future in (waiter, stopper):
        future.cancel()
    await migration.aclose()
    for name in migration.registry.names():
        service: Any = migration.registry.withdraw(name)
        service.close_connections()
        service.close()
    await asyncio.sleep(0)
    if moved_away:
        takeover.retire()  # as the command does: leave without taking the successor's CPU


if __name__ == "__main__":
    _common.setup_process()
    asyncio.run(main(sys.argv[1]))
