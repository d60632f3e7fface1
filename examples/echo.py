"""A line echo server that can move to another process with its connections.

python examples/echo.py --port 8007 --control /tmp/echo.sock
takeover take /tmp/echo.sock      # another process takes it; clients stay

To another host (docs/crosshost.md): --control tcp:HOST:PORT --secret-file F
--release-address 'ip addr del ...', then `takeover take --cross-host` there.
"""

from __future__ import annotations

import argparse
import asyncio

import takeover.asyncio as takeover


class Echo(asyncio.Protocol):
    """Echoes each complete line; a partial line waits (and moves) until its end."""

    def __init__(self) -> None:
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        if lines and self.transport is not None:
            self.transport.write(b"\n".join(lines) + b"\n")


async def main(args: argparse.Namespace) -> None:
    server = await takeover.start_server(Echo, args.host, args.port, name="echo")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        release_address=args.release_address,  # a move to another host (docs/crosshost.md)
        ready=lambda m: print(f"echo on {args.host}:{args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8007)
    takeover.add_control_options(parser)
    takeover.add_release_address_option(parser)
    asyncio.run(main(parser.parse_args()))
