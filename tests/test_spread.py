"""The work a move does before the pause is cut in slices, the service running in between.

The dry run (:class:`SpreadCheck`, over the server's ``takeover_parts()``),
the slots of the sockets sent ahead and their batches each hold the event
loop for a slice, not for the whole of the work: in one process, with a real
server, real clients and a real take, the loop is seen to turn between
slices and a client is answered while the dry run is under way. What changes
between slices (a connection closed during the dry run, or while its socket
waits to be sent ahead) does not break the move, and leaks nothing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness.waiting import wait_until_async
from takeover._core import originator
from takeover._core.ahead import SocketsAhead
from takeover._core.graphpath import SpreadCheck, Unpicklable, check_graph
from takeover._core.pickling import dumps
from takeover.asyncio import MigratableServer, MigrationServer, connect, start_server

CONNECTIONS = 300
LAMBDA = "cannot pickle 'function' object (a lambda)"


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Room:
    def __init__(self) -> None:
        self.members: list[Member] = []


class Member(Echo):
    """Every member refers to the room, and the room to every member."""

    room = Room()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.room.members.append(self)


class Beat:
    """Counts the turns of the event loop (a task that yields again and again)."""

    def __init__(self) -> None:
        self.turns = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


async def serving(
    control: str, count: int, factory: Callable[[], asyncio.Protocol] = Echo
) -> tuple[MigratableServer, MigrationServer, list[socket.socket]]:
    server = await start_server(factory, "127.0.0.1", 0, name="echo")
    migration = MigrationServer(control)
    await migration.start()
    migration.publish(server)
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        clients.append(client)
        await loop.sock_connect(client, server.sockets[0].getsockname())
    await wait_until_async(lambda: len(server.connections) == count, what="the connections")
    return server, migration, clients


async def take_and_check(
    control: str, migration: MigrationServer, clients: list[socket.socket], expected: int
) -> None:
    """Take the service in this process; every client still open echoes through it."""
    loop = asyncio.get_running_loop()
    try:
        session = await connect(control, allow=(__name__,))
        try:
            taken = await session.take("echo", loop)
        finally:
            await session.close()
    except BaseException:
        for client in clients:
            client.close()
        await migration.aclose()
        raise
    new: Any = taken.service
    try:
        assert taken.connections == expected
        for client in clients:
            if client.fileno() >= 0:
                await loop.sock_sendall(client, b"after\n")
                assert await loop.sock_recv(client, 100) == b"after\n"
    finally:
        await shut(new, migration, clients)


async def shut(server: Any, migration: MigrationServer, clients: list[socket.socket]) -> None:
    """Close the clients, the server's connections and itself, and the migration server."""
    for client in clients:
        client.close()
    server.close_connections()
    server.close()
    await wait_until_async(lambda: not server.connections, what="the closes")
    await migration.aclose()


def recorded_failures(monkeypatch: pytest.MonkeyPatch) -> list[Exception]:
    """Why each spread dry run failed, if it did."""
    failures: list[Exception] = []
    real = SpreadCheck.step

    def step(self: SpreadCheck, turn: float) -> bool:
        done = real(self, turn)
        if done and self.failed is not None:
            failures.append(self.failed)
        return done

    monkeypatch.setattr(SpreadCheck, "step", step)
    return failures


def close_with_its_client(transport: Any, clients: list[socket.socket]) -> None:
    """Close a connection on both sides (the server's side first)."""
    port = transport._sock.getpeername()[1]
    transport.close()
    next(c for c in clients if c.fileno() >= 0 and c.getsockname()[1] == port).close()


@pytest.fixture
def sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices as small as they go: one group of connections per dry-run step, 64
    slots and one batch of descriptors per turn."""
    monkeypatch.setattr(originator, "DRY_RUN_TURN", 0.0)
    monkeypatch.setattr(originator, "AHEAD_SLOTS_PER_TURN", 64)
    monkeypatch.setattr(originator, "BATCHES_PER_TURN", 1)


def recorded(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, beat: list[Beat]) -> list[int]:
    """The loop's turn count at each call of ``owner.name`` (a generator's at each item)."""
    seen: list[int] = []
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(beat[0].turns)
        result = real(*args, **kwargs)
        if isinstance(result, Iterator):
            return _each(result)
        return result

    def _each(items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            seen.append(beat[0].turns)
            yield item

    monkeypatch.setattr(owner, name, wrapper)
    return seen


def test_the_loop_turns_between_the_slices_and_a_client_is_answered_meanwhile(
    control: str, sliced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    beat: list[Beat] = []
    steps = recorded(monkeypatch, SpreadCheck, "step", beat)
    adds = recorded(monkeypatch, SocketsAhead, "add", beat)
    batches = recorded(monkeypatch, SocketsAhead, "batches", beat)
    answered: list[bytes] = []

    async def main() -> None:
        server, migration, clients = await serving(control, CONNECTIONS)
        beat.append(Beat())
        real_step = SpreadCheck.step
        asker = clients[-1]

        def step(self: SpreadCheck, turn: float) -> bool:
            if len(steps) == 2:
                asker.send(b"during the dry run\n")
            done = real_step(self, turn)
            if done:
                try:
                    answered.append(asker.recv(100))
                except BlockingIOError:
                    answered.append(b"")
            return done

        monkeypatch.setattr(SpreadCheck, "step", step)
        try:
            await take_and_check(control, migration, clients, CONNECTIONS)
        finally:
            await beat[0].stop()
            server.close()

    asyncio.run(main())
    # 300 connections in groups of 32, then the server itself: 11 steps.
    assert len(steps) == 11, steps
    assert strictly_increasing(steps), steps
    assert answered == [b"during the dry run\n"]
    # 301 slots (the listener too), 64 at a time, after the empty adds of two
    # constructors (the move's "nothing yet", then the real one).
    assert len(adds) == 2 + 5 and strictly_increasing(adds[2:]), adds
    # Two batches of descriptors (253 + 47), a turn between them.
    assert len(batches) == 1 + 2 and batches[1] < batches[2], batches


def test_a_connection_closed_during_the_dry_run_is_left_out(
    control: str, sliced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed between two slices of the dry run, one after its slice, one before (its
    closed socket is met, but it has left the server by the end): the move goes on
    without them, the others move, and the whole graph is not checked again."""
    fallbacks: list[Any] = []
    real_check_graph = originator.check_graph

    def check_graph_again(*args: Any) -> Any:
        fallbacks.append(args[0])
        return real_check_graph(*args)

    monkeypatch.setattr(originator, "check_graph", check_graph_again)
    failures = recorded_failures(monkeypatch)

    async def main() -> None:
        server, migration, clients = await serving(control, CONNECTIONS)
        real_step = SpreadCheck.step
        calls = [0]

        def step(self: SpreadCheck, turn: float) -> bool:
            calls[0] += 1
            if calls[0] == 2:
                # Its part (the 11th connection) was pickled in the first slice.
                close_with_its_client(self.parts[10], clients)
                close_with_its_client(self.parts[200], clients)
            return real_step(self, turn)

        monkeypatch.setattr(SpreadCheck, "step", step)
        try:
            await take_and_check(control, migration, clients, CONNECTIONS - 2)
        finally:
            server.close()

    asyncio.run(main())
    assert failures == [] and fallbacks == []  # no need to check the whole graph again


def test_a_socket_closed_before_its_batch_is_sent_leaves_its_slot_unused(
    control: str, sliced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed after it got its slot, before its batch went: a filler of the same kind
    goes in its place (the number may be another socket's by then), and nothing leaks
    (the fixture counts this process's descriptors: both sides of the move are here)."""
    fillers: list[int] = []

    async def main() -> None:
        server, migration, clients = await serving(control, CONNECTIONS)
        real_batches = SocketsAhead.batches

        def batches(self: SocketsAhead, size: int) -> Iterator[Any]:
            for index, item in enumerate(real_batches(self, size)):
                if index == 0:
                    # The last socket is in the second batch: close its connection now.
                    # The last connection's socket is in the second batch (the
                    # listener's is last of all): close the connection now.
                    by_socket = {t._sock: t for t in server.connections}
                    transport = by_socket[self.sockets[-2]]
                    close_with_its_client(transport, clients)
                yield item
                fillers.append(len(self._fillers))

        monkeypatch.setattr(SocketsAhead, "batches", batches)
        try:
            await take_and_check(control, migration, clients, CONNECTIONS - 1)
        finally:
            server.close()

    asyncio.run(main())
    assert fillers == [0, 1]


# -- SpreadCheck on its own -----------------------------------------------------


def spread(server: MigratableServer, turn: float = 0.0) -> SpreadCheck:
    check = SpreadCheck(server, server.takeover_parts(), current_parts=server.takeover_parts)
    while not check.step(turn):
        pass
    return check


@pytest.mark.parametrize("factory", [Echo, Member], ids=["independent", "a shared room"])
def test_the_slices_find_what_the_whole_graph_does(control: str, factory: Any) -> None:
    async def main() -> None:
        server, migration, clients = await serving(control, 100, factory)
        try:
            check = spread(server)
            assert check.failed is None
            assert check.slices == 5 if factory is Echo else check.slices >= 1
            whole = dumps(server)
            assert {id(s) for s in check.sockets} == {id(s) for s in whole.sockets}
            # Nearly the same bytes: each slice is a pickle of its own (a few bytes).
            assert abs(check.size - len(whole.blob)) < 0.1 * len(whole.blob)

            # Unpicklable: the slices fail, and check_graph says where.
            server.connections[57].get_protocol().on_done = lambda: None  # type: ignore[attr-defined]
            check = spread(server)
            assert check.failed is not None
            problem = check_graph(server, "echo")
            assert isinstance(problem, Unpicklable)
            assert str(problem) == f"echo.connections[57].protocol.on_done: {LAMBDA}"
        finally:
            await shut(server, migration, clients)
            Member.room.members.clear()

    asyncio.run(main())


def test_a_closed_socket_still_in_the_graph_fails_the_slices(control: str) -> None:
    """A connection whose socket is closed but that is still one of the server's."""

    async def main() -> None:
        server, migration, clients = await serving(control, 40)
        try:
            parts = server.takeover_parts
            check = SpreadCheck(server, parts(), current_parts=parts)
            assert not check.step(0.0)
            server.connections[35]._sock.close()  # not through the transport: still listed
            while not check.step(0.0):
                pass
            assert check.failed is not None
            assert "closed socket" in str(check.failed)
        finally:
            await shut(server, migration, clients)

    asyncio.run(main())


def test_a_socket_given_twice_gets_one_slot() -> None:
    """(Two slots for one socket would put the recipient's pickle memo out of step.)"""
    ours, theirs = socket.socketpair()
    try:
        ahead = SocketsAhead([ours, theirs, ours])
        ahead.add([theirs])
        assert ahead.sockets == [ours, theirs]
        assert [k[0] for k in ahead.kinds] == [2]
    finally:
        ours.close()
        theirs.close()
