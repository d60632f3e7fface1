"""An aiohttp application whose listener moves to its successor.

python examples/aiohttp_app.py --port 8080 --control /tmp/http.sock
python examples/aiohttp_app.py --port 8080 --control /tmp/http.sock    # again: an upgrade

GET / answers `hello from pid N`; GET /slow?seconds=S answers after S seconds
(the `aiohttp` extra). The second process takes the listening socket, and the
connections queued in it, from the first, which accepts no more and drains
with aiohttp's own graceful shutdown: every response from then on says
`Connection: close`; the connections still idle --grace seconds after the
move are closed (between two requests); requests in flight finish; and
whatever is left at the --drain deadline is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiohttp import web
from aiohttp.typedefs import Handler

import takeover.asyncio as takeover
from takeover import TakeoverError


class Draining:
    """Whether this process drains, and the connections with a request in progress
    (an object: the state of a started application is frozen)."""

    def __init__(self) -> None:
        self.active = False
        self.busy: dict[object, int] = {}


DRAINING = web.AppKey("draining", Draining)


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello from pid {os.getpid()}\n")


async def slow(request: web.Request) -> web.Response:
    seconds = float(request.query.get("seconds", "1"))
    await asyncio.sleep(seconds)
    return web.Response(text=f"slow {seconds} s from pid {os.getpid()}\n")


@web.middleware
async def drainable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts the requests in progress on each connection until their response is
    written; while draining, each response closes its connection (`Connection: close`)."""
    state, connection = request.app[DRAINING], request.protocol
    state.busy[connection] = state.busy.get(connection, 0) + 1
    try:
        response = await handler(request)
        if state.active:
            response.force_close()  # before aiohttp prepares the headers: they say so
        if not response.prepared:
            await response.prepare(request)
            await response.write_eof()
        return response
    finally:
        left = state.busy.pop(connection) - 1
        if left:
            state.busy[connection] = left


def application() -> web.Application:
    app = web.Application(middlewares=[drainable])
    app[DRAINING] = Draining()
    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    return app


async def _until(done: object, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while not done() and loop.time() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def drain(app: web.Application, runner: web.AppRunner, grace: float, limit: float) -> None:
    """aiohttp's graceful shutdown, with the deadline this example promises.

    aiohttp's own (``runner.cleanup()``) waits up to ``shutdown_timeout`` for
    a request in flight, then as long again once it has cancelled it: the
    waiting is done here instead, and cleanup() only cancels what the
    deadline left (the runner's shutdown_timeout is a fraction of a second).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    app[DRAINING].active = True
    server = runner.server
    assert server is not None
    # Connections accepted just before the move have their request answered
    # (Connection: close), keep-alive ones close after their next response.
    await _until(lambda: not server.connections, started + grace)
    # Then idle keep-alive connections are closed, busy ones after their response.
    for connection in server.connections:
        if connection not in app[DRAINING].busy:
            connection.force_close()
    await _until(lambda: not server.connections, started + limit)
    # Stop the site (this process's copy of the listener: a close(), no
    # shutdown()) and cancel whatever is still at work.
    await runner.cleanup()


async def main(args: argparse.Namespace) -> None:
    app = application()
    async with takeover.listen(
        args.host, args.port, name="http", backlog=args.backlog, **takeover.control_options(args)
    ) as listener:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.SockSite(runner, listener.socket, backlog=args.backlog)
        await site.start()
        origin = f"taken from pid {listener.predecessor_pid}" if listener.taken else "bound"
        print(
            f"aiohttp on {args.host}:{args.port} (pid {os.getpid()}, {origin}), "
            f"control {listener.control}",
            flush=True,
        )
        moved = await listener.wait()
        listener.stop_accepting()  # done already if moved: the successor accepts
        what = f"moved to pid {listener.successor_pid}" if moved else "stopping"
        print(f"{what}; draining", flush=True)
        await drain(app, runner, args.grace, args.drain)
        print("drained", flush=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--drain", type=float, default=10.0, help="seconds for connections to end (default 10)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=1.0,
        help="seconds before idle keep-alive connections are closed while draining (default 1)",
    )
    takeover.add_control_options(parser)
    return parser


if __name__ == "__main__":
    try:
        asyncio.run(main(arguments().parse_args()))
    except TakeoverError as exc:  # the predecessor goes on serving
        sys.exit(f"takeover: error: {exc}")
