"""What a recipient does with state pickled by another takeover.

A server's pickled state says which layout it has. A recipient whose
takeover reads another layout refuses the graph, naming both, so the move
rolls back and the originator goes on serving: nothing is lost, and the
message says what to upgrade.
"""

from __future__ import annotations

import asyncio
import copyreg
import os
import socket

import pytest

from harness.waiting import wait_until_async
from takeover import MigrationRefusedError
from takeover.asyncio import MigratableServer


class _Reduced:
    """Pickles as a MigratableServer built from ``state`` (what an older takeover sent)."""

    def __init__(self, state: dict[str, object]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[object, ...]:
        return (copyreg._reconstructor, (MigratableServer, object, None), self.state)  # type: ignore[attr-defined]


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def test_server_state_of_another_layout_is_refused_naming_both() -> None:
    """A server state without the layout this takeover reads is refused, not half-built."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        old = MigratableServer(listener, Echo, "echo", loop)
        try:
            for layout in (None, 2, 4):
                state = old.__getstate__()
                if layout is None:
                    del state["_state_version"]
                else:
                    state["_state_version"] = layout
                new = MigratableServer.__new__(MigratableServer)
                with pytest.raises(ValueError, match=rf"layout {layout}; this takeover reads 3"):
                    new.__setstate__(state)
                assert "_sock" not in new.__dict__
        finally:
            old.discard()

    asyncio.run(main())


def test_a_graph_of_another_layout_rolls_back_with_the_reason() -> None:
    """Loaded as a move would, that state is a refusal naming the layouts."""
    from takeover._core.pickling import dumps, loads
    from takeover._core.policy import UnpicklePolicy

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        old = MigratableServer(listener, Echo, "echo", asyncio.get_running_loop())
        try:
            state = old.__getstate__()
            state["_state_version"] = 2
            dumped = dumps(_Reduced(state))
            fds = [os.dup(s.fileno()) for s in dumped.sockets]
            with pytest.raises(MigrationRefusedError, match="layout 2; this takeover reads 3"):
                loads(dumped.blob, fds, policy=UnpicklePolicy(allow=(__name__,)))
        finally:
            old.discard()

    asyncio.run(main())


def test_peername_and_sockname_after_a_move() -> None:
    """get_extra_info() answers in the new process (asyncio's _extra slot never travelled)."""
    import os

    from takeover._core.pickling import dumps, loads
    from takeover._core.policy import UnpicklePolicy

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
            new = loads(dumped.blob, [os.dup(s.fileno()) for s in dumped.sockets], policy=policy)
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
