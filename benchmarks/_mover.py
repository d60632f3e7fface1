"""A recipient started ahead of time: takes every service at CONTROL when told to.

    python benchmarks/_mover.py CONTROL

What ``takeover take --json CONTROL`` does, through the library API, with the
process start and the imports done before the move: prints
``{"event": "ready"}``, waits for a line ``go`` on stdin, then connects, takes
every service, publishes them again at CONTROL (rename over it, before the
conversation ends, as the command does) and prints ``{"event": "taken", ...}``
per service and ``{"event": "serving", ...}``. It serves until its services
have moved on (then exits 0) or until SIGINT/SIGTERM (then closes them):
``takeover.cli.hold``, as the command does.
"""

from __future__ import annotations

import asyncio
import os
import sys

import _common

import takeover.asyncio as takeover
from takeover.cli import hold
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
    await hold(migration)  # as the command does, retiring once it has moved on


if __name__ == "__main__":
    _common.setup_process()
    asyncio.run(main(sys.argv[1]))
