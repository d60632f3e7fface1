"""A hostile originator: its service graph makes the recipient run a command.

The service ("evil") is a line echo, served by takeover's real originator, but
its protocol factory holds a payload that pickles as a call chosen by the
attacker, one that creates the file MARKER if it runs:

* ``system``: ``os.system("touch MARKER")`` (the pickle names ``posix.system``);
* ``eval``: ``eval("open(MARKER, 'w').close()")`` (``builtins.eval``);
* ``subprocess``: ``subprocess.call(["touch", MARKER])``.

    python tests/apps/hostile.py --port PORT --control PATH --payload system --marker FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from typing import Any

# The repository's root, for harness/; a recipient that loads this script runs this too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import takeover.asyncio as takeover
from harness import echo


class Payload:
    """Harmless here; pickled, it is a call of the attacker's choosing."""

    def __init__(self, kind: str, marker: str) -> None:
        self.kind = kind
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        if self.kind == "system":
            return (os.system, (f"touch '{self.marker}'",))
        if self.kind == "eval":
            return (eval, (f"open({self.marker!r}, 'w').close()",))
        if self.kind == "subprocess":
            return (subprocess.call, (["touch", self.marker],))
        raise ValueError(f"unknown payload {self.kind!r}")


class Echo(echo.Echo):
    """The line echo (harness/echo.py), as a class of this script: a recipient allows it."""


class Factory:
    """The protocol factory, carrying the payload into the graph."""

    def __init__(self, payload: Payload) -> None:
        self.payload = payload

    def __call__(self) -> Echo:
        return Echo()


async def main(args: argparse.Namespace) -> None:
    factory = Factory(Payload(args.payload, args.marker))
    server = await takeover.start_server(factory, "127.0.0.1", args.port, name="evil")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"evil on {args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--payload", choices=["system", "eval", "subprocess"], required=True)
    parser.add_argument("--marker", required=True)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
