"""Twins: idle transports travel as a memo entry, built on the recipient from their socket.

In one process, with real sockets and a real server: the originator's side
(:class:`SocketsAhead` with the server's twins, the memo-seeded pickle) and
the recipient's (:class:`Twins` built as the sockets arrive, the seeded
unpickler), and what must not go wrong on the way: a connection closed in the
meantime, one with output waiting, one whose addresses were read, and graphs
that misuse the memo.
"""

from __future__ import annotations

import asyncio
import copyreg
import gc
import io
import os
import pickle
import socket
import subprocess
import sys
from typing import Any

import pytest

import pythons
from harness.waiting import wait_until_async
from takeover._core.ahead import SocketsAhead, Twins, build_sockets
from takeover._core.errors import MigrationRefusedError, ProtocolError, SerializationError
from takeover._core.pickling import dumps, loads
from takeover._core.policy import UnpicklePolicy
from takeover.asyncio import MigratableServer, MigratableTransport

POLICY = UnpicklePolicy(allow=(__name__,))
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_ahead(sent_ahead: SocketsAhead, twins: Twins | None) -> list[socket.socket]:
    """What the recipient builds from the batches sent ahead (small batches)."""
    built: list[socket.socket] = []
    for batch, kinds in sent_ahead.batches(2):
        sockets = build_sockets([os.dup(fd) for fd in batch], kinds)
        built.extend(sockets)
        if twins is not None:
            twins.add(sockets, [k[4] for k in kinds for _ in range(k[0])])
    return built


async def serving(count: int) -> tuple[MigratableServer, list[socket.socket]]:
    """A started echo server on loopback and ``count`` clients it has accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = MigratableServer(listener, Echo, "echo", asyncio.get_running_loop())
    server.start()
    clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(count)]
    await wait_until_async(lambda: len(server.connections) == count, what="the connections")
    return server, clients


def recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        assert chunk, "closed"
        data += chunk
    return data


def test_idle_connections_travel_as_twins_the_others_in_full() -> None:
    """Idle: the twin itself; closed since: its twin left, its socket closed; output
    waiting or addresses read: in full. Every client is served after the move."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        old, clients = await serving(4)
        by_port = {t.get_extra_info("peername")[1]: t for t in old.connections}
        # get_extra_info above cached the addresses of all four: forget them,
        # so that only the one read again below carries them.
        for transport in old.connections:
            del transport.__dict__["_info"]
        idle, addressed, writing, closing = (by_port[c.getsockname()[1]] for c in clients)
        before = open_count()

        # Originator: the dry run, the sockets (and twins) sent ahead.
        sent_ahead = SocketsAhead(dumps(old).sockets, old.takeover_twins(), old.takeover_twin_kind)
        assert sent_ahead.twin_kind == "asyncio"
        twins = Twins(sent_ahead.twin_kind, POLICY)
        ahead = send_ahead(sent_ahead, twins)
        assert sum(1 for o in twins.objects if isinstance(o, MigratableTransport)) == 4

        # Meanwhile the service runs: one connection closes.
        closing.close()
        clients[3].close()
        await wait_until_async(lambda: len(old.connections) == 3, what="the close")

        old.quiesce()
        writing.write(b"pending\n")  # kept in the paused transport's buffer
        addressed.get_extra_info("peername")
        sent_ahead.forget_closed()
        sent_ahead.unfit(old.takeover_unfit())
        dumped = dumps(old, ahead=sent_ahead)
        assert dumped.sockets == sent_ahead.sockets  # nothing new since the dry run
        new = loads(dumped.blob, [], policy=POLICY, ahead=ahead, unpickler=twins.unpickler)

        slot = {sock: i for i, sock in enumerate(sent_ahead.sockets)}
        moved = {t._sock.fileno(): t for t in new.connections}
        assert len(moved) == 3
        twin_of_idle = twins.objects[slot[idle._sock]]
        assert twin_of_idle in new.connections  # the twin itself, no copy
        assert twin_of_idle._protocol.transport is twin_of_idle
        for unfit in (addressed, writing):
            assert twins.objects[slot[unfit._sock]] not in new.connections
        (carried,) = [t for t in new.connections if t._buffer]
        assert bytes(carried._buffer) == b"pending\n"
        (informed,) = [t for t in new.connections if "_info" in t.__dict__]
        assert informed.get_extra_info("peername") == clients[1].getsockname()

        new.adopt(loop)
        new.start()
        old.release()
        twins.close_leftovers()
        # The socket of the connection closed meanwhile was closed; its twin was left.
        assert ahead[slot[closing._sock]].fileno() == -1
        # Gone: the closed connection's client and server sides, and the old
        # server's poller; the listener and 3 connections changed hands.
        assert open_count() == before - 3 + 1  # + the new server's poller

        try:
            assert await loop.run_in_executor(None, recv_line, clients[2]) == b"pending\n"
            for client in clients[:3]:
                client.sendall(b"after\n")
                assert await loop.run_in_executor(None, recv_line, client) == b"after\n"
        finally:
            for client in clients:
                client.close()
            new.close_connections()
            new.close()
            await wait_until_async(lambda: not new.connections, what="the closes")
            new.discard()

    asyncio.run(main())


def test_a_graph_that_puts_something_else_among_the_connections_is_refused() -> None:
    """A server's connections may be transports only: no attribute set on a class."""
    state = {
        "service_name": "x",
        "protocol_factory": Echo,
        "_sock": None,
        "_loop": None,
        "_transports": [MigratableTransport],
        "_protocols": [Echo()],
        "_poller": None,
        "_serving": False,
        "_quiesced": True,
        "_state_version": 3,
    }

    server = MigratableServer.__new__(MigratableServer)

    class Forge(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if obj is server:
                return (copyreg.__newobj__, (MigratableServer,), state)
            return NotImplemented

    buffer = io.BytesIO()
    Forge(buffer, 5).dump(server)
    with pytest.raises(MigrationRefusedError, match="connection is a type"):
        loads(buffer.getvalue(), [], policy=POLICY)
    assert "_protocol" not in vars(MigratableTransport)


def test_unknown_kind_of_twin_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown kind of twin 'twisted'"):
        Twins("twisted")
    with pytest.raises(ProtocolError, match="unknown kind of twin 3"):
        Twins(3)


def test_memo_reference_beyond_the_twins_refused_and_everything_closed() -> None:
    """A graph naming a memo entry nobody made: refused, every socket sent ahead closed."""
    a, b = socket.socketpair()
    try:
        sent_ahead = SocketsAhead([a, b], {a: object()}, "asyncio")
        twins = Twins("asyncio", POLICY)
        before = open_count()
        ahead = send_ahead(sent_ahead, twins)
        assert len(twins.objects) == 2 and isinstance(twins.objects[0], MigratableTransport)
        with pytest.raises(MigrationRefusedError, match="Memo value not found at index 9"):
            loads(b"\x80\x05h\x09.", [], ahead=ahead, unpickler=twins.unpickler)
        assert all(sock.fileno() == -1 for sock in ahead)
        assert open_count() == before
    finally:
        a.close()
        b.close()


def test_a_connection_closed_since_the_dry_run_is_no_twin() -> None:
    """Closed between the dry run and the pause, a connection still referred to fails
    to pickle, as any closed socket does, instead of arriving as nobody's transport."""

    async def main() -> None:
        server, (client,) = await serving(1)
        try:
            (transport,) = server.connections
            sent_ahead = SocketsAhead(
                dumps(server).sockets, server.takeover_twins(), server.takeover_twin_kind
            )
            transport.close()
            await wait_until_async(lambda: not server.connections, what="the close")
            server.quiesce()
            sent_ahead.forget_closed()
            sent_ahead.unfit(server.takeover_unfit())
            assert len(dumps(server, ahead=sent_ahead).blob) > 0  # the server alone moves
            with pytest.raises(SerializationError, match="closed socket"):
                dumps((server, transport), ahead=sent_ahead)
        finally:
            client.close()
            server.resume()
            server.close()
            await asyncio.sleep(0)  # one turn of the loop: what resume() scheduled runs
            server.discard()

    asyncio.run(main())


PURE_PYTHON_MOVE = """
import asyncio, os, socket
from takeover.asyncio import MigratableServer, MigratableTransport
from takeover._core.ahead import SocketsAhead, Twins, build_sockets
from takeover._core.pickling import dumps, loads
from takeover._core.policy import UnpicklePolicy

async def main():
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair() for _ in range(3)]
    transports = [MigratableTransport(a, None, None) for a, _ in pairs]
    graph = {"transports": transports}
    twins_by_socket = {t._sock: t for t in transports}
    sent_ahead = SocketsAhead([t._sock for t in transports], twins_by_socket, "asyncio")
    size = len(sent_ahead.memo)
    twins = Twins("asyncio", UnpicklePolicy(trust=True))
    ahead = []
    for batch, kinds in sent_ahead.batches(2):
        built = build_sockets([os.dup(fd) for fd in batch], kinds)
        ahead += built
        twins.add(built, [k[4] for k in kinds for _ in range(k[0])])
    first = dumps(graph, ahead=sent_ahead).blob
    second = dumps(graph, ahead=sent_ahead).blob
    assert len(sent_ahead.memo) == size and first == second, (len(sent_ahead.memo), size)
    trusted = UnpicklePolicy(trust=True)
    moved = loads(first, [], ahead=ahead, unpickler=twins.unpickler, policy=trusted)
    assert moved["transports"] == twins.objects
    print("ok", len(first))
    for sock in ahead + [s for pair in pairs for s in pair]:
        sock.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("python", ["pypy3", "this"])
def test_the_memo_of_twins_is_not_used_up_by_a_pickling(python: str) -> None:
    """The pure-Python pickler (PyPy) adds to the memo it is given: it gets a copy,
    so the same SocketsAhead pickles twice alike; the pure-Python unpickler seeds."""
    python = sys.executable if python == "this" else pythons.require(python)
    out = subprocess.run(
        [python, "-c", PURE_PYTHON_MOVE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok "), out.stdout


TWINS_FIRST = """
import socket, sys
from takeover.asyncio._transport import new_twins
sockets = [socket.socket() for _ in range(100)]
twins = new_twins(sockets)  # the first transports of this process, as on a recipient
for twin in twins:  # what the server that claims them sets, and start()
    twin._protocol, twin._server, twin._quiesced = None, None, False
shared = twins[-1].__dict__
print(sys.getsizeof(shared), sys.getsizeof(dict(shared)))
for sock in sockets:
    sock.close()
"""


@pythons.instance_values
def test_twins_share_their_attribute_names_as_the_originators_transports_do() -> None:
    """Twins built before any transport has attributes still get CPython's
    key-sharing instance dicts, not one dict each (about 270 bytes more per
    connection on the recipient than on the originator)."""
    out = subprocess.run(
        [sys.executable, "-c", TWINS_FIRST],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr
    shared, own = map(int, out.stdout.split())
    assert shared < own, (shared, own)  # values only: the names are the class's


@pythons.instance_values
def test_asking_whether_a_twin_was_claimed_builds_it_no_dict() -> None:
    """Reading ``__dict__`` makes CPython give an instance a dict object it then
    keeps (64 bytes per connection): what a recipient asks of each twin after
    the start must not."""
    sockets = [socket.socket() for _ in range(2)]
    try:
        twins = Twins("asyncio", POLICY)
        twins.add(sockets, [1, 1])
        claimed, left = twins.objects
        claimed._server = object()
        twins.close_leftovers()
        for twin in (claimed, left):
            assert not any(type(r) is dict for r in gc.get_referents(twin))
        assert hasattr(claimed, "_server") and not hasattr(left, "_server")
    finally:
        for sock in sockets:
            sock.close()
