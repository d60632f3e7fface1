"""The pickling of a move across hosts (takeover._core.pickling.CrossHostPickler and
GraphLoad's reconstructors), with real sockets on loopback: what is refused, and
naming what; what a listener becomes. The whole move is in tests/test_crosshost.py."""

from __future__ import annotations

import pickle
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from takeover._core.crosspickle import dumps_cross_host
from takeover._core.errors import MigrationRefusedError, ProtocolError, SerializationError
from takeover._core.pickling import loads
from takeover._core.tcprepair import cross_host_refusal


def no_checkpoint(sock: socket.socket) -> dict[str, Any]:
    raise AssertionError(f"{sock!r} should not have been checkpointed")


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """A listener on loopback, a client, and the server's end of their connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            yield listener, client, server
        finally:
            client.close()
            server.close()


def test_unix_socket_refused_naming_it():
    left, right = socket.socketpair()
    with left, right:
        refusal = cross_host_refusal(left)
        assert refusal is not None and "cannot move a UNIX socket" in refusal
        assert f"fd {left.fileno()}" in refusal
        with pytest.raises(SerializationError, match="UNIX socket"):
            dumps_cross_host({"peer": left}, pickle.HIGHEST_PROTOCOL, no_checkpoint)


def test_half_closed_connection_refused_naming_it(connection):
    _listener, client, server = connection
    assert cross_host_refusal(server) is None
    client.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""  # the FIN has come: CLOSE_WAIT
    peer = client.getsockname()
    with pytest.raises(SerializationError, match="CLOSE_WAIT") as raised:
        dumps_cross_host({"c": server}, pickle.HIGHEST_PROTOCOL, no_checkpoint)
    assert str(peer) in str(raised.value)


def test_tls_socket_still_refused():
    context = ssl.create_default_context()
    with (
        socket.socket() as raw,
        context.wrap_socket(
            raw, server_hostname="example.org", do_handshake_on_connect=False
        ) as wrapped,
        pytest.raises(SerializationError, match="TLS"),
    ):
        dumps_cross_host({"s": wrapped}, pickle.HIGHEST_PROTOCOL, no_checkpoint)


def test_connection_travels_as_its_checkpoint(connection):
    """The reduction puts the checkpoint in the descriptor's place; a recipient
    of a same-host move refuses it."""
    _listener, _client, server = connection
    states = []

    def checkpoint(sock: socket.socket) -> dict[str, Any]:
        states.append(sock)
        return {"version": 1, "marker": "state"}

    dumped = dumps_cross_host([server, server], pickle.HIGHEST_PROTOCOL, checkpoint)
    assert states == [server] and dumped.sockets == [server]
    assert b"_repaired_socket" in dumped.blob and b"marker" in dumped.blob
    with pytest.raises(ProtocolError, match="not a move across hosts"):
        loads(dumped.blob, ())


def test_listener_rebuilt_bound_and_listening():
    """A listener travels as family, address, backlog and options; rebuilt with
    IP_FREEBIND, listening, non-blocking (and refused outside a move across hosts)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(77)
    address = listener.getsockname()
    with listener:
        dumped = dumps_cross_host({"l": listener}, pickle.HIGHEST_PROTOCOL, no_checkpoint)
    assert dumped.sockets == []
    with pytest.raises(ProtocolError, match="not a move across hosts"):
        loads(dumped.blob, ())
    graph = loads(dumped.blob, (), repaired=[])
    rebuilt = graph["l"]
    with rebuilt:
        assert rebuilt.getsockname() == address
        assert rebuilt.gettimeout() == 0.0
        assert rebuilt.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert rebuilt.getsockopt(socket.IPPROTO_IP, 15)  # IP_FREEBIND
        with socket.create_connection(address) as client:
            rebuilt.setblocking(True)
            accepted, _ = rebuilt.accept()
            accepted.close()
            assert client.fileno() >= 0


def test_listener_that_cannot_bind_is_refused_and_closed():
    """The address is taken here: the load fails, naming it, and closes what it built."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        dumped = dumps_cross_host({"l": listener}, pickle.HIGHEST_PROTOCOL, no_checkpoint)
        with pytest.raises(MigrationRefusedError, match="cannot listen on"):
            loads(dumped.blob, (), repaired=[])
