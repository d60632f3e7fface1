"""A plain ASGI application under uvicorn whose listener moves to its successor.

python examples/uvicorn_app.py --port 8000 --control /tmp/asgi.sock
python examples/uvicorn_app.py --port 8000 --control /tmp/asgi.sock    # again: an upgrade

GET / answers `hello from pid N`; GET /slow?seconds=S answers after S seconds
(the `uvicorn` extra). The second process takes the listening socket, and the
connections queued in it, from the first, which accepts no more and drains
with uvicorn's own graceful shutdown: every response from then on says
`Connection: close`; the connections still idle --grace seconds after the
move are closed (between two requests); requests in flight finish; and
whatever is left at the --drain deadline is cancelled (uvicorn answers it 500).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable
from urllib.parse import parse_qs

import uvicorn

import takeover.asyncio as takeover
from takeover import TakeoverError


class App:
    """The ASGI application: two routes, and `Connection: close` while draining."""

    def __init__(self) -> None:
        self.draining = False

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            query = parse_qs(scope.get("query_string", b"").decode())
            seconds = float(query.get("seconds", ["1"])[0])
            await asyncio.sleep(seconds)
            status, body = 200, f"slow {seconds} s from pid {os.getpid()}\n"
        elif scope["path"] == "/":
            status, body = 200, f"hello from pid {os.getpid()}\n"
        else:
            status, body = 404, "not found\n"
        data = body.encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(data)).encode()),
        ]
        if self.draining:
            headers.append((b"connection", b"close"))  # uvicorn closes after this response
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class Server(uvicorn.Server):
    """uvicorn's server, leaving SIGINT and SIGTERM to the application (Listener.wait)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _until(done: object, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while not done() and loop.time() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def drain(app: App, server: Server, serving: asyncio.Future[None], args: Any) -> None:
    """uvicorn's graceful shutdown, once connections had --grace seconds to end by themselves."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    app.draining = True
    connections = server.server_state.connections
    # Connections accepted just before the move have their request answered
    # (Connection: close), keep-alive ones close after their next response.
    await _until(lambda: not connections, started + args.grace)
    # Then uvicorn closes its copy of the listener (a close(), no shutdown()),
    # closes idle connections, and waits for requests in flight until the deadline.
    server.config.timeout_graceful_shutdown = max(0.0, started + args.drain - loop.time())  # type: ignore[assignment]
    server.should_exit = True
    await serving


async def main(args: argparse.Namespace) -> None:
    app = App()
    config = uvicorn.Config(
        app,
        lifespan="off",
        http="h11",
        ws="none",
        access_log=False,
        log_level="warning",
        backlog=args.backlog,
    )
    server = Server(config)
    async with takeover.listen(
        args.host, args.port, name="http", backlog=args.backlog, **takeover.control_options(args)
    ) as listener:
        serving = asyncio.ensure_future(server.serve(sockets=[listener.socket]))
        await _until(lambda: server.started or serving.done(), float("inf"))
        if serving.done():
            serving.result()  # it failed to start: say why
            return
        origin = f"taken from pid {listener.predecessor_pid}" if listener.taken else "bound"
        print(
            f"uvicorn on {args.host}:{args.port} (pid {os.getpid()}, {origin}), "
            f"control {listener.control}",
            flush=True,
        )
        moved = await listener.wait()
        listener.stop_accepting()  # done already if moved: the successor accepts
        what = f"moved to pid {listener.successor_pid}" if moved else "stopping"
        print(f"{what}; draining", flush=True)
        await drain(app, server, serving, args)
        print("drained", flush=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
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
