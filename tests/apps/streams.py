"""An asyncio streams echo (``client_connected_cb``): its listener moves, its connections drain.

Each line is answered ``N PID LINE`` (N counts this connection's lines).
A coroutine serves each connection, so none can move: a move takes the
listener (and its accept queue), and the old process serves the
connections it has until they close, or until ``--drain`` seconds have
passed (then each is told ``bye`` and closed).

    python tests/apps/streams.py --port PORT --control PATH [--drain SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import takeover.asyncio as takeover


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    count = 0
    try:
        while line := await reader.readline():
            count += 1
            writer.write(f"{count} {os.getpid()} ".encode() + line)
            await writer.drain()
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> None:
    server = await takeover.start_server(
        echo, "127.0.0.1", args.port, name="streams", drain=args.drain
    )
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"streams on {args.port}, control {m.path}", flush=True),
    )
    print(f"pid {os.getpid()} drained", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--drain", type=float, default=None)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
