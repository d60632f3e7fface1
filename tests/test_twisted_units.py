"""takeover.twisted's ports and connections in this process, on a recording reactor.

No reactor runs here: the fake one records what is registered, so each test
can tell exactly when a descriptor would be watched.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import protocol, tcp

from takeover._core.graphpath import check_graph
from takeover._core.pickling import dumps, loads
from takeover._core.policy import UnpicklePolicy
from takeover.twisted import GRAPH_MODULES, MigratablePort, listen_tcp


@pytest.fixture(autouse=True, scope="module")
def reserved_fd() -> None:
    """Twisted's listening ports keep one spare descriptor (for EMFILE) for good:
    reserve it before the per-test descriptor accounting starts."""
    tcp._reservedFD.reserve()


class Reactor:
    """Records readers and writers, like IReactorFDSet, and runs nothing."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer: Any) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer: Any) -> None:
        self.writers.discard(writer)


class Keeper(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = 0

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class KeeperFactory(protocol.Factory):
    protocol = Keeper


@pytest.fixture
def served() -> Iterator[tuple[Reactor, MigratablePort, socket.socket, Any]]:
    """A listening port with one accepted connection, and its client socket."""
    reactor = Reactor()
    service = listen_tcp(0, KeeperFactory(), name="keeper", interface="127.0.0.1", reactor=reactor)
    client = socket.create_connection(("127.0.0.1", service.getHost().port), timeout=5)
    service.port.doRead()  # accept
    (connection,) = service.connections
    try:
        yield reactor, service, client, connection
    finally:
        client.close()
        for held in service.connections:
            held.socket.close()
        service.port.socket.close()


def test_accepted_connections_belong_to_the_port(served):
    reactor, service, _client, connection = served
    assert connection.protocol.made == 1
    assert reactor.readers == {service.port, connection}
    assert service.describe()["connections"] == 1


def test_quiesce_stops_everything_and_buffers_writes_resume_restores(served):
    reactor, service, _client, connection = served
    service.quiesce()
    assert reactor.readers == set() and reactor.writers == set()
    connection.write(b"held back")
    connection.stopReading()  # recorded, not passed on
    connection.startReading()
    assert reactor.writers == set() and reactor.readers == set()
    assert connection._tko_pending() == len(b"held back")
    service.resume()
    assert reactor.writers == {connection}
    assert reactor.readers == {service.port, connection}


def test_the_graph_carries_unsent_output_and_the_protocol_unreset(served):
    reactor, service, client, connection = served
    connection.protocol.received = b"half a li"
    service.quiesce()
    connection.write(b"first ")
    connection.write(b"second")
    dumped = dumps(service)
    fds = [os.dup(fd) for fd in dumped.fds]
    moved = loads(dumped.blob, fds, policy=UnpicklePolicy((*GRAPH_MODULES, __name__)))
    try:
        assert isinstance(moved, MigratablePort)
        (copy,) = moved.connections
        assert copy.protocol is not connection.protocol
        assert copy.protocol.received == b"half a li" and copy.protocol.made == 1
        assert copy.protocol.transport is copy and copy.server is moved.port
        assert copy._tempDataBuffer == [b"first ", b"second"] and copy._tko_pending() == 12
        other = Reactor()
        moved.adopt(other)
        assert other.readers == set() and other.writers == set()  # nothing before start()
        service.release()
        assert reactor.readers == set() and reactor.writers == set()
        moved.start()
        assert other.writers == {copy} and other.readers == {moved.port, copy}
        assert copy.doWrite() is None
        assert client.recv(100) == b"first second"
    finally:
        moved.discard()


class Brittle(Keeper):
    """A protocol whose migration hooks all fail."""

    def takeover_quiesce(self) -> None:
        raise RuntimeError("cannot pause")

    def takeover_adopted(self) -> None:
        raise RuntimeError("cannot re-arm")


def test_hooks_fail_as_on_asyncio(served, caplog):
    """A failing takeover_quiesce stops the move; a failing takeover_adopted is logged
    and the service starts all the same (its connections read and write)."""
    reactor, service, _client, connection = served
    connection.protocol.__class__ = Brittle
    with pytest.raises(RuntimeError, match="cannot pause"):
        service.quiesce()
    reactor.readers.clear()
    with caplog.at_level("ERROR", logger="takeover.hooks"):
        service.start()
    assert "takeover_adopted() of" in caplog.text and "cannot re-arm" in caplog.text
    assert reactor.readers == {service.port, connection}


def test_release_closes_without_shutdown(served):
    """After release the client sees no EOF: the socket (held elsewhere too) is untouched."""
    _reactor, service, client, connection = served
    elsewhere = socket.socket(fileno=os.dup(connection.socket.fileno()))
    try:
        service.quiesce()
        service.release()
        assert connection.socket.fileno() == -1
        client.settimeout(0.3)
        with pytest.raises(socket.timeout):
            client.recv(1)
        elsewhere.sendall(b"still here")
        client.settimeout(5)
        assert client.recv(100) == b"still here"
    finally:
        elsewhere.close()


def test_dry_run_names_the_path_through_the_port(served):
    _reactor, service, _client, connection = served
    connection.protocol.on_done = lambda: None
    problem = check_graph(service, "keeper", 5)
    assert problem is not None
    assert problem.path == "keeper.port.connections[0].protocol.on_done", problem.path


def test_adopting_outside_a_running_asyncio_reactor_is_refused(served):
    from takeover._core.errors import MigrationRefusedError

    _reactor, service, _client, _connection = served
    with pytest.raises(MigrationRefusedError, match="runtime twisted"):
        service.adopt(None)  # no Twisted reactor installed in this process
