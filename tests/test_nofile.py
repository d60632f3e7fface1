"""takeover take receives more descriptors than its soft RLIMIT_NOFILE allows.

A service brings one descriptor per connection. With the common soft limit of
1024, the kernel used to drop the ones that did not fit (MSG_CTRUNC) and the
move failed; ``takeover take`` now raises its soft limit to the hard limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shlex
import socket

import pytest

from harness.procs import APPS, PYTHON, Proc
from harness.waiting import wait_until

CONNECTIONS = 300
SOFT = 256


def _connections(control: str) -> int:
    """How many connections the originator at ``control`` holds now."""
    import takeover.asyncio as takeover

    async def count() -> int:
        session = await takeover.connect(control)
        try:
            return sum(int(s.get("connections", 0)) for s in await session.list())
        finally:
            await session.close()

    return asyncio.run(count())


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < CONNECTIONS + 100,
    reason="the hard RLIMIT_NOFILE is too low for this test",
)
def test_take_raises_its_soft_nofile_limit(control: str, free_port: int, procs: list[Proc]) -> None:
    originator = Proc(
        [
            PYTHON,
            os.path.join(APPS, "multi_echo.py"),
            "--port",
            str(free_port),
            "--control",
            control,
        ]
    )
    procs.append(originator)
    originator.expect("control")
    clients: list[socket.socket] = []
    try:
        for _ in range(CONNECTIONS):
            clients.append(socket.create_connection(("127.0.0.1", free_port), timeout=10))
        wait_until(lambda: _connections(control) == CONNECTIONS, what="every connection accepted")
        take = f"ulimit -Sn {SOFT} && exec {shlex.quote(PYTHON)} -m takeover take --json"
        recipient = Proc(["bash", "-c", f"{take} {shlex.quote(control)}"])
        procs.append(recipient)
        taken = json.loads(recipient.expect(r'"event": "taken"').string)
        assert taken["connections"] == CONNECTIONS
        assert originator.wait() == 0
        for i in (0, CONNECTIONS // 2, CONNECTIONS - 1):
            clients[i].sendall(b"still here\n")
            assert clients[i].recv(100) == b"still here\n"
    finally:
        for client in clients:
            client.close()
