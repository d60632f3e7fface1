"""A line echo where a client may switch its connection to TLS (which cannot move).

Each complete line is echoed back, except two commands:

* ``pid``: answers ``pid P`` (the process that serves this connection);
* ``starttls``: answers ``ok``, then the connection speaks TLS (the server's
  certificate is ``--cert``/``--key``). A TLS session cannot move: a partial
  move (``takeover take --drain``) leaves it here to drain, and at the
  deadline ``takeover_drain_close`` says ``bye`` over TLS and closes it
  politely.

    python tests/apps/mixed.py --port PORT --control PATH --cert PEM --key PEM
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
from typing import Any

import takeover.asyncio as takeover

CONTEXT: list[ssl.SSLContext] = []  # this process's own (not pickled)
TASKS: set[asyncio.Task[None]] = set()


class Mixed(asyncio.Protocol):
    def __init__(self) -> None:
        self.pending = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if line == b"pid":
                self.transport.write(f"pid {os.getpid()}\n".encode())
            elif line == b"starttls":
                self.transport.write(b"ok\n")
                # Nothing more is read as plain text: the client's hello is TLS.
                self.transport.pause_reading()
                task = asyncio.ensure_future(self._start_tls())
                TASKS.add(task)
                task.add_done_callback(TASKS.discard)
            else:
                self.transport.write(line + b"\n")

    async def _start_tls(self) -> None:
        # loop.start_tls() that works on uvloop too (uvloop's refuses takeover's transports).
        self.transport = await takeover.start_tls(
            self.transport, self, CONTEXT[0], server_side=True
        )

    def takeover_drain_close(self) -> None:
        self.transport.write(b"bye\n")
        self.transport.close()


async def main(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    CONTEXT.append(context)
    server = await takeover.start_server(Mixed, "127.0.0.1", args.port, name="mixed")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"mixed on {args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
