"""A line echo server on asyncio streams whose listener moves to its successor.

python examples/streams_echo.py --port 8007 --control /tmp/echo.sock
python examples/streams_echo.py --port 8007 --control /tmp/echo.sock    # again: an upgrade

The second process takes the listening socket, and the connections queued
in it, from the first, which accepts no more and drains. Each connection is
closed politely (a FIN after a complete echoed line, then its input read
until the client closes, so that no RST is sent): after its next line; if
it is still idle --grace seconds after the move; at the --drain deadline at
the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

import takeover.asyncio as takeover
from takeover import TakeoverError


class Connection:
    """One client: its handler task, and whether it waits with no partial line."""

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.idle = True
        self.cut = False  # cancelled by the drain (not by anything else)

    def close_now(self) -> None:
        if self.task is not None and not self.cut:
            self.cut = True
            self.task.cancel()


class Echo:
    """The echo service: its connections and whether it drains."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self.draining = False
        self.close_by: float | None = None  # the drain's deadline (loop time), plus half a second

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection()
        self.connections.add(connection)
        try:
            await self._echo(reader, writer, connection)
        except asyncio.CancelledError:
            if not connection.cut:
                raise
        except ConnectionError:
            pass
        finally:
            await self._close(reader, writer)
            self.connections.discard(connection)

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> None:
        pending = b""
        while True:
            connection.idle = not pending
            data = await reader.read(65536)
            connection.idle = False
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            if lines:
                writer.write(b"\n".join(lines) + b"\n")
                await writer.drain()
                if self.draining and not pending:
                    return  # between two lines: the polite moment to close

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """FIN after the last echo, then read until the client closes (bounded): no RST."""
        linger = 2.0
        if self.close_by is not None:
            linger = max(0.1, min(linger, self.close_by - asyncio.get_running_loop().time()))
        try:
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()
                await asyncio.wait_for(_discard(reader), linger)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError, OSError):
            pass
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            await writer.wait_closed()

    async def drain(self, grace: float, deadline: float) -> int:
        """Close every connection politely; how many were cut at the deadline."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = True
        self.close_by = started + deadline + 0.5
        await _until(lambda: not self.connections, started + grace)
        for connection in list(self.connections):
            if connection.idle:
                connection.close_now()
        await _until(lambda: not self.connections, started + deadline)
        cut = len(self.connections)
        for connection in list(self.connections):
            connection.close_now()
        await _until(lambda: not self.connections, started + deadline + 0.9)
        return cut


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def _until(done: object, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while not done() and loop.time() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    echo = Echo()
    async with takeover.listen(
        args.host, args.port, name="echo", backlog=args.backlog, **takeover.control_options(args)
    ) as listener:
        server = await asyncio.start_server(echo.handle, sock=listener.socket, backlog=args.backlog)
        origin = f"taken from pid {listener.predecessor_pid}" if listener.taken else "bound"
        print(
            f"streams echo on {args.host}:{args.port} (pid {os.getpid()}, {origin}), "
            f"control {listener.control}",
            flush=True,
        )
        moved = await listener.wait()
        listener.stop_accepting()  # done already if moved: the successor accepts
        server.close()  # closes this process's copy of the listener (no shutdown())
        print(f"{'moved to pid ' + str(listener.successor_pid) if moved else 'stopping'}; draining")
        cut = await echo.drain(args.grace, args.drain)
        print(f"drained ({cut} connection(s) closed at the deadline)", flush=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8007)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--drain", type=float, default=10.0, help="seconds for connections to end (default 10)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=1.0,
        help="seconds before idle connections are closed while draining (default 1)",
    )
    takeover.add_control_options(parser)
    return parser


if __name__ == "__main__":
    try:
        asyncio.run(main(arguments().parse_args()))
    except TakeoverError as exc:  # the predecessor goes on serving
        sys.exit(f"takeover: error: {exc}")
