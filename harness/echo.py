"""The line echo: the protocol the test apps and the benchmarks serve, and its client side.

:class:`Echo` echoes each complete line; a partial line waits (and moves with
the service) until its end. :func:`serve_lines` is the same echo as an
asyncio streams ``client_connected_cb(reader, writer)``: a coroutine serves
each connection, so its connections cannot move (they drain). Both import
nothing of takeover, so that the benchmarks' plain-asyncio baselines serve
the very same code.

A script that serves it defines a subclass of its own, ``class
Echo(echo.Echo)``: a graph names the class of each protocol, and a recipient
loads a class of the originator's script from that script and allows it,
whereas this module's class would need ``takeover take --allow harness.echo``
and the repository's root on the recipient's ``sys.path``. (examples/echo.py
keeps its own copy: it is an example for users, and imports nothing of this.)
"""

from __future__ import annotations

import asyncio
import socket


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


async def serve_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The line echo as a streams coroutine: each complete line back, until EOF."""
    try:
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                break  # EOF; a partial line is dropped, as a closing Echo drops it
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (the socket's timeout bounds each read)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {data!r}, expected {size} bytes")
        data += chunk
    return data


def echo(sock: socket.socket, line: bytes) -> bytes:
    """Send ``line`` and read back as many bytes."""
    sock.sendall(line)
    return recv_exact(sock, len(line))
