"""The WebSocket benchmark's server: an echo on takeover.websocket.

    python benchmarks/_ws_app.py --control PATH [--port 0] [--no-deflate]

On ``/ws`` each text message is answered ``PID COUNT TEXT``: the pid of the
process that answered and how many messages this connection has sent so far
(``COUNT`` is an attribute of the protocol, so it moves with the connection:
a count that restarts or skips after a move shows a lost or repeated
message, or a state that did not move). permessage-deflate is accepted when
the client offers it (``--no-deflate``: refused).

With $BENCH_WS_FAULT set (``drop:N``, ``dup:N``, ``close:N``; the
benchmark's own test), every Nth message of a connection is not answered,
answered twice, or closes it: what the benchmark must catch.

Prints ``{"event": "ready", "port": P, ...}`` once it serves, and
``{"event": "exit", ...}`` after its service has moved away.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

# benchmarks/, for _common: a recipient that loads this script by path runs this too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common

import takeover.asyncio as takeover
from takeover.websocket import WebSocketProtocol


class Echo(WebSocketProtocol):
    """Each text message back, after this process's pid and the connection's count."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def text_received(self, text: str) -> None:
        self.count += 1
        self.send_text(f"{os.getpid()} {self.count} {text}")

    def bytes_received(self, data: bytes) -> None:
        self.send_bytes(data)


class Deflateless(Echo):
    """The same echo, refusing permessage-deflate."""

    deflate = False


FAULT = os.environ.get("BENCH_WS_FAULT", "")
"""For the benchmark's own test: ``drop:N``, ``dup:N`` or ``close:N``."""


class Faulty(Echo):
    """The echo with a fault ($BENCH_WS_FAULT, read by every process the service
    goes through): every Nth message of a connection is not answered (``drop``),
    answered twice (``dup``), or ends the connection with 1011 (``close``)."""

    def text_received(self, text: str) -> None:
        kind, _, every = FAULT.partition(":")
        if (self.count + 1) % int(every):
            super().text_received(text)
        elif kind == "drop":
            self.count += 1
        elif kind == "dup":
            super().text_received(text)
            self.send_text(f"{os.getpid()} {self.count} {text}")
        else:
            self.count += 1
            self.close_websocket(1011, "fault")


async def main(args: argparse.Namespace) -> None:
    factory = Faulty if FAULT else Deflateless if args.no_deflate else Echo
    server = await takeover.start_server(factory, args.host, args.port, name="ws", backlog=4096)
    port = server.sockets[0].getsockname()[1]
    await takeover.serve_until_moved(
        server,
        control=args.control,
        ready=lambda m: _common.emit("ready", port=port, pid=os.getpid(), nofile=list(limits)),
    )
    _common.emit("exit", memory=_common.memory())


if __name__ == "__main__":
    limits = _common.setup_process()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control", required=True)
    parser.add_argument("--no-deflate", action="store_true", help="refuse permessage-deflate")
    asyncio.run(main(parser.parse_args()))
