"""A WebSocket echo server (the websockets library) whose listener moves to its successor.

python examples/websockets_app.py --port 8765 --control /tmp/ws.sock
python examples/websockets_app.py --port 8765 --control /tmp/ws.sock    # again: an upgrade

Each message is echoed; `sleep S` answers `slept S` after S seconds, and
`pid` answers `pid N` (the `websockets` extra). The second process takes the
listening socket, and the connections queued in it, from the first, which
accepts no more (the opening handshakes it began still complete) and drains. Each
connection is closed with code 1012 (service restart), so that its client
reconnects to the new process: after its next answer; if it is still idle
--grace seconds after the move; at the --drain deadline at the latest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import takeover.asyncio as takeover
from takeover import TakeoverError

SERVICE_RESTART = 1012


class Connection:
    """One client: its handler task, and whether it waits for a message."""

    def __init__(self, websocket: ServerConnection) -> None:
        self.websocket = websocket
        self.task = asyncio.current_task()
        self.idle = True
        self.cut = False  # its handler cancelled by the drain (not by anything else)

    async def restart(self, cancel: bool = False) -> None:
        """Close with 1012; with ``cancel``, also stop the handler if it is still at work."""
        with contextlib.suppress(ConnectionClosed, OSError):
            await self.websocket.close(SERVICE_RESTART, "service restart")
        if cancel and self.task is not None and not self.task.done():
            self.cut = True
            self.task.cancel()


class Echo:
    """The echo service: its connections and whether it drains."""

    def __init__(self) -> None:
        self.connections: dict[ServerConnection, Connection] = {}
        self.draining = False

    async def handler(self, websocket: ServerConnection) -> None:
        connection = self.connections[websocket] = Connection(websocket)
        try:
            async for message in websocket:
                connection.idle = False
                await websocket.send(await self.answer(message))
                connection.idle = True
                if self.draining:
                    # Between two messages: the polite moment to close.
                    await connection.restart()
                    return
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            if not connection.cut:
                raise
        finally:
            del self.connections[websocket]

    async def answer(self, message: str | bytes) -> str | bytes:
        if isinstance(message, str) and message.startswith("sleep "):
            seconds = float(message.split()[1])
            await asyncio.sleep(seconds)
            return f"slept {seconds}"
        if message == "pid":
            return f"pid {os.getpid()}"
        return message

    async def drain(self, grace: float, deadline: float) -> int:
        """Close every connection with 1012; how many were still at work at the deadline."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.draining = True
        await _until(lambda: not self.connections, started + grace)
        idle = [c.restart() for c in list(self.connections.values()) if c.idle]
        if idle:
            await asyncio.gather(*idle)
        await _until(lambda: not self.connections, started + deadline)
        left = list(self.connections.values())
        if left:
            await asyncio.gather(*(c.restart(cancel=True) for c in left))
        await _until(lambda: not self.connections, started + deadline + 0.9)
        return len(left)


async def _until(done: object, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while not done() and loop.time() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def main(args: argparse.Namespace) -> None:
    echo = Echo()
    async with takeover.listen(
        args.host, args.port, name="ws", backlog=args.backlog, **takeover.control_options(args)
    ) as listener:
        server = await serve(
            echo.handler, sock=listener.socket, backlog=args.backlog, close_timeout=1
        )
        origin = f"taken from pid {listener.predecessor_pid}" if listener.taken else "bound"
        print(
            f"websockets on {args.host}:{args.port} (pid {os.getpid()}, {origin}), "
            f"control {listener.control}",
            flush=True,
        )
        moved = await listener.wait()
        # No more accepts here (done already if moved). The websockets server
        # is not closed yet: it would answer 503 to handshakes in progress.
        listener.stop_accepting()
        what = f"moved to pid {listener.successor_pid}" if moved else "stopping"
        print(f"{what}; draining", flush=True)
        cut = await echo.drain(args.grace, args.drain)
        server.close()  # closes this process's copy of the listener (no shutdown())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        print(f"drained ({cut} connection(s) closed at the deadline)", flush=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
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
