"""A recipient started ahead of time: takes every service at CONTROL when told to.

    python benchmarks/_mover.py CONTROL [--loop asyncio|uvloop]

What ``takeover take --json CONTROL`` does, through the same library function
(``takeover.asyncio.take_and_serve``), with the process start and the imports
done before the move: prints ``{"event": "ready"}``, waits for a line ``go``
on stdin, then takes every service, publishes them again at CONTROL and
prints ``{"event": "taken", ...}`` per service and ``{"event": "serving",
...}``. It serves until its services have moved on (then exits 0) or until
SIGINT/SIGTERM (then closes them). ``--loop uvloop`` runs it on uvloop
(``uvloop.run``, as ``takeover take --loop uvloop`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import _common

import takeover.asyncio as takeover
from takeover import UnpicklePolicy


async def main(control: str) -> int:
    loop = asyncio.get_running_loop()
    # Started ahead: what the take imports (the unpickling policy's vetted modules,
    # sysconfig) is imported now, not on the service's CPU during the move.
    UnpicklePolicy().prepare()
    _common.emit("ready", pid=os.getpid())
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return 0
    result = await takeover.take_and_serve(
        control,
        on_taken=lambda taken: _common.emit("taken", **taken.summary()),
        on_failed=lambda name, exc: _common.emit("failed", service=name, error=str(exc)),
        on_serving=lambda migration: _common.emit(
            "serving", control=migration.path, pid=os.getpid()
        ),
    )
    return 1 if result.failed or not result.taken else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("control")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    _common.setup_process()
    if args.loop == "uvloop":
        import uvloop

        sys.exit(uvloop.run(main(args.control)))
    sys.exit(asyncio.run(main(args.control)))
