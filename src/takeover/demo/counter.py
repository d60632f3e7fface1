"""The demo's service: a line counter that says which process answered.

Each line a client sends is answered with the serving process's pid, the
client's own line count and the count over all clients. The counts live in
the protocol objects and in one shared ``Tally``, so after a move the pid
changes and the counts carry on.

    python -m takeover.demo.counter --port 8023 --control /tmp/counter.sock
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from .. import asyncio as takeover


class Tally:
    """State shared by every connection: the total line count."""

    def __init__(self) -> None:
        self.lines = 0

    def __call__(self) -> Counter:
        return Counter(self)


class Counter(asyncio.Protocol):
    """Answers each line with the pid and the counts."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.lines = 0
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self.lines += 1
            self.tally.lines += 1
            reply = (
                f"pid {os.getpid()}: {line.decode(errors='replace')!r} is your line "
                f"{self.lines}, line {self.tally.lines} in all\n"
            )
            assert self.transport is not None
            self.transport.write(reply.encode())


async def serve(host: str, port: int, options: dict[str, Any]) -> None:
    """Serve the counter on ``host:port`` until it has moved away."""
    server = await takeover.start_server(Tally(), host, port, name="counter")
    await takeover.serve_until_moved(
        server,
        **options,
        ready=lambda m: print(f"counter on {host}:{port}, pid {os.getpid()}, control {m.path}"),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="takeover's demo service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8023)
    takeover.add_control_options(parser)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, takeover.control_options(args)))
