"""A graph pickled by an older takeover still starts here.

Moving a service to new code is what takeover is for, so its own classes must
accept the state an older release pickled. The recipient starts a service only
after COMMITTED, when the originator has let go of the connections: a start()
that fails there loses every one of them (found by benchmarks/load.py when a
server's ``_poller`` appeared between the originator's code and the
recipient's).
"""

from __future__ import annotations

import asyncio
import socket

from harness.waiting import wait_until_async
from takeover._aio_transport import MigratableServer


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def test_server_state_without_poller_starts() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        old = MigratableServer(listener, Echo, "echo", loop)
        state = old.__getstate__()
        del state["_poller"]  # as pickled before the server had one
        new = MigratableServer.__new__(MigratableServer)
        new.__setstate__(state)
        new.adopt(loop)
        new.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            answer = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            await writer.wait_closed()
            return answer
        finally:
            new.close_connections()
            new.close()
            await wait_until_async(lambda: not new.connections, what="the closes")
            new.discard()

    assert asyncio.run(main()) == b"ping\n"


def test_peername_and_sockname_after_a_move() -> None:
    """get_extra_info() answers in the new process (asyncio's _extra slot never travelled)."""
    import os

    from takeover._policy import UnpicklePolicy
    from takeover._serialize import dumps, loads

    async def main() -> tuple[object, object, object, object]:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()
        old = MigratableServer(listener, Echo, "echo", loop)
        old.start()
        client = socket.create_connection(address, timeout=10)
        await wait_until_async(lambda: old.connections, what="the connection")
        old.quiesce()
        dumped = dumps(old)
        try:
            policy = UnpicklePolicy(allow=(__name__,))
            new = loads(dumped.blob, [os.dup(fd) for fd in dumped.fds], policy=policy)
        except BaseException:
            client.close()
            old.discard()
            raise
        new.adopt(loop)
        new.start()
        old.release()
        (transport,) = new.connections
        try:
            return (
                transport.get_extra_info("peername"),
                client.getsockname(),
                transport.get_extra_info("sockname"),
                address,
            )
        finally:
            client.close()
            new.close_connections()
            new.close()
            await wait_until_async(lambda: not new.connections, what="the closes")
            new.discard()

    peer, client_address, local, listening = asyncio.run(main())
    assert peer == client_address
    assert local == listening
