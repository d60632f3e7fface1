"""A line echo server whose protocol can be told to hold something unpicklable.

A client line is echoed back, except for three commands, each answered
``ok COMMAND``:

* ``lambda``: the protocol stores a lambda as ``self.on_done``;
* ``lock``: it stores a ``threading.Lock`` as ``self.lock``;
* ``drop``: it forgets both.

``takeover_quiesce`` prints ``quiesced pid P``, so a test can tell whether the
service was ever paused.

    python tests/apps/fragile.py --port PORT --control PATH
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from typing import Any

# The repository's root, for harness/; a recipient that loads this script runs this too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import takeover.asyncio as takeover
from harness import echo


class Fragile(echo.Echo):
    """The line echo (harness/echo.py), with three commands."""

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self.line_received(line.decode())

    def line_received(self, line: str) -> None:
        assert self.transport is not None
        held: dict[str, Any] = self.__dict__
        if line == "lambda":
            self.on_done = lambda: None
        elif line == "lock":
            self.lock = threading.Lock()
        elif line == "drop":
            held.pop("on_done", None)
            held.pop("lock", None)
        else:
            self.transport.write(f"{line}\n".encode())
            return
        self.transport.write(f"ok {line}\n".encode())

    def takeover_quiesce(self) -> None:
        print(f"quiesced pid {os.getpid()}", flush=True)


async def main(args: argparse.Namespace) -> None:
    server = await takeover.start_server(Fragile, "127.0.0.1", args.port, name="fragile")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"fragile on {args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
