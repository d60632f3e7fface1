"""A service in transit is sealed: a change from outside rolls the move back or is refused.

In one process, with real sockets, a real server and a real arbiter (both
sides' handles on one memfd): what a write, a close or a pause made from
outside the service after its graph was pickled does, before and after the
recipient commits, and what a released transport says to a writer that kept
a reference to it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from harness.waiting import wait_until_async
from takeover import ConnectionMovedError
from takeover._core.arbiter import COMMITTED, NOTE_LIMIT, PENDING, ROLLED_BACK, Arbiter
from takeover._core.originator import _Move
from takeover.asyncio import MigratableServer


class Quiet(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def serving() -> tuple[MigratableServer, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = MigratableServer(listener, Quiet, "feed", asyncio.get_running_loop())
    server.start()
    client = socket.create_connection(listener.getsockname(), timeout=10)
    await wait_until_async(lambda: len(server.connections) == 1, what="the connection")
    return server, client


def sealed(server: MigratableServer) -> tuple[_Move, Arbiter]:
    """Quiesce ``server`` and seal it for a move; return the move and the recipient's arbiter."""
    move = _Move(None, "feed")  # type: ignore[arg-type]  # late_call needs no session
    move.arbiter = Arbiter.create()
    recipient = Arbiter.adopt(os.dup(move.arbiter.fd))
    server.quiesce()
    server.takeover_seal(move.late_call)
    return move, recipient


def push_late(transport: Any) -> None:
    """A writer outside the service."""
    transport.write(b"late\n")


def test_a_late_write_rolls_the_move_back_and_goes_out_on_resume() -> None:
    async def main() -> None:
        server, client = await serving()
        move, recipient = sealed(server)
        transport = server.connections[0]
        push_late(transport)
        push_late(transport)  # decided already: no second note
        assert move.late is not None
        assert "write() on the connection from 127.0.0.1:" in move.late
        assert "of service 'feed'" in move.late
        assert f"{os.path.basename(__file__)}:" in move.late and "in push_late" in move.late
        # The recipient, coming to commit, finds ROLLED_BACK and why.
        assert recipient.decide(COMMITTED) == ROLLED_BACK
        assert recipient.note() == move.late
        assert not transport.is_closing()
        server.resume()
        received = b""
        while received != b"late\nlate\n":
            received += await asyncio.to_thread(client.recv, 100)
        for arbiter in (move.arbiter, recipient):
            assert arbiter is not None
            arbiter.close()
        client.close()
        server.close_connections()
        server.close()
        await asyncio.sleep(0)

    asyncio.run(main())


def test_a_write_after_the_recipient_committed_raises_and_sends_nothing() -> None:
    async def main() -> None:
        server, client = await serving()
        move, recipient = sealed(server)
        transport = server.connections[0]
        # The recipient's copy of the connection, which it now owns.
        theirs = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        assert recipient.decide(COMMITTED) == COMMITTED
        with pytest.raises(
            ConnectionMovedError,
            match=r"write\(\) on the connection from .*"
            r"now belongs to another process.*nothing was sent",
        ):
            push_late(transport)
        assert isinstance(ConnectionMovedError("x"), ConnectionError)
        assert transport.is_closing()
        assert move.late is None
        transport.close()  # as on a closed transport: nothing, no error
        transport.pause_reading()
        server.release()
        with pytest.raises(ConnectionMovedError):
            transport.write(b"again\n")
        with pytest.raises(ConnectionMovedError):
            transport.write_eof()
        assert "moved" in repr(transport)
        # Nothing reached the client, and the connection is the recipient's, open.
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):
            client.recv(100)
        theirs.sendall(b"from the recipient\n")
        client.settimeout(10)
        assert client.recv(100) == b"from the recipient\n"
        theirs.close()
        client.close()
        for arbiter in (move.arbiter, recipient):
            assert arbiter is not None
            arbiter.close()

    asyncio.run(main())


def test_a_close_or_a_pause_in_transit_rolls_back_and_applies_on_resume() -> None:
    async def main() -> None:
        server, client = await serving()
        move, recipient = sealed(server)
        transport = server.connections[0]
        protocol = transport.get_protocol()
        transport.pause_reading()
        assert move.late is not None and move.late.startswith("pause_reading() on the connection")
        transport.close()
        assert recipient.decide(COMMITTED) == ROLLED_BACK
        server.resume()
        # The close took effect once the service resumed: the client sees EOF.
        assert await asyncio.to_thread(client.recv, 100) == b""
        await wait_until_async(lambda: protocol.lost, what="connection_lost")
        client.close()
        server.close()
        for arbiter in (move.arbiter, recipient):
            assert arbiter is not None
            arbiter.close()

    asyncio.run(main())


def test_without_a_seal_a_quiesced_transport_buffers_as_before() -> None:
    """Quiesced but not sealed (before the pickle, or on a recipient before start)."""

    async def main() -> None:
        server, client = await serving()
        server.quiesce()
        transport = server.connections[0]
        transport.write(b"buffered\n")
        assert transport.get_write_buffer_size() == len(b"buffered\n")
        server.resume()
        client.settimeout(10)
        assert client.recv(100) == b"buffered\n"
        client.close()
        server.close_connections()
        server.close()
        await asyncio.sleep(0)

    asyncio.run(main())


def test_the_arbiter_keeps_the_first_decisions_note() -> None:
    originator = Arbiter.create()
    recipient = Arbiter.adopt(os.dup(originator.fd))
    try:
        assert os.pread(originator.fd, 1, 0) == PENDING
        assert originator.decide(ROLLED_BACK, "é" * NOTE_LIMIT) == ROLLED_BACK
        assert recipient.decide(COMMITTED, "not recorded") == ROLLED_BACK
        note = recipient.note()
        # Cut at NOTE_LIMIT bytes, never mid-character in a way that raises.
        assert note.startswith("é" * (NOTE_LIMIT // 2 - 1)) and len(note.encode()) <= NOTE_LIMIT + 3
    finally:
        originator.close()
        recipient.close()
