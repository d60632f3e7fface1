"""A protocol with a timer: sends ``tick N pid P`` every 20 ms.

It shows the hooks a protocol uses to move a ``call_later`` handle, which
cannot be pickled: drop it from the state, cancel it on quiesce, re-arm it on
resume (rollback) and on adoption (after commit, in the new process).

    python tests/apps/ticker.py --port PORT --control PATH [--unix PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
from typing import Any

import takeover.asyncio as takeover

INTERVAL = 0.02


class Ticker(asyncio.Protocol):
    def __init__(self) -> None:
        self.count = 0
        self.transport: asyncio.Transport | None = None
        self.handle: asyncio.TimerHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "handle": None}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()

    def _arm(self) -> None:
        self.handle = asyncio.get_running_loop().call_later(INTERVAL, self._tick)

    def _disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        self.count += 1
        assert self.transport is not None
        self.transport.write(f"tick {self.count} pid {os.getpid()}\n".encode())
        self._arm()

    def takeover_quiesce(self) -> None:
        self._disarm()
        if os.environ.get("TICKER_FAIL_HOOK") == "quiesce":
            raise RuntimeError("this ticker refuses to be paused")

    def takeover_resume(self) -> None:
        self._arm()

    def takeover_adopted(self) -> None:
        self._arm()
        if os.environ.get("TICKER_FAIL_HOOK") == "adopted":
            raise RuntimeError("this ticker's adopted hook fails after re-arming")


async def main(args: argparse.Namespace) -> None:
    services = [await takeover.start_server(Ticker, "127.0.0.1", args.port, name="ticker")]
    if args.unix:
        services.append(await takeover.start_unix_server(Ticker, args.unix, name="ticker-unix"))

    def ready(migration: takeover.MigrationServer) -> None:
        if args.spare_fds is not None:
            # Room for exactly that many more descriptors: accept() then
            # fails with EMFILE, as on a server that ran out of them.
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + args.spare_fds, hard))
        print(f"ticker on {args.port}, control {migration.path}", flush=True)

    await takeover.serve_until_moved(*services, **takeover.control_options(args), ready=ready)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    takeover.add_control_options(parser)
    parser.add_argument("--unix")
    parser.add_argument("--spare-fds", type=int)
    asyncio.run(main(parser.parse_args()))
