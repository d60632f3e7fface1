"""takeover.websocket's state moves: a connection pickled at any byte boundary goes on
exactly as one that never moved (a property test), under the recipient's strict policy.

In one process: a wsproto client (with or without permessage-deflate) talks to a
:class:`WebSocketProtocol`; the client's bytes are cut at random points, and at
each cut the server side is pickled with takeover's pickler and rebuilt with
its unpickler and the default policy, as a move does. What the application
received and what the client decoded must equal an uncut run's.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from takeover._core.errors import MigrationRefusedError, SerializationError
from takeover._core.pickling import dumps, loads
from takeover._core.policy import UnpicklePolicy
from takeover.websocket import MovableDeflate, WebSocketProtocol, _frames


class Wire:
    """A transport that keeps what the protocol wrote."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


STRICT = UnpicklePolicy()


def move(server: WebSocketProtocol, policy: UnpicklePolicy = STRICT) -> Any:
    """Pickle ``server`` (without its transport) as a move does, and rebuild it."""
    transport = server.transport
    server.transport = None
    try:
        dumped = dumps(server)
    finally:
        server.transport = transport
    moved = loads(dumped.blob, [], policy=policy)
    moved.transport = transport
    return moved


def handshake(deflate: bool) -> tuple[WSConnection, WebSocketProtocol, Wire]:
    client = WSConnection(ConnectionType.CLIENT)
    server = WebSocketProtocol()
    wire = Wire()
    server.connection_made(wire)  # type: ignore[arg-type]
    offer = [PerMessageDeflate()] if deflate else []
    server.data_received(client.send(Request(host="x", target="/ws", extensions=offer)))
    client.receive_data(bytes(wire.data))
    wire.data.clear()
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection)
    assert bool(events[0].extensions) == deflate
    return client, server, wire


def test_a_protocol_moves_under_the_strict_policy_in_every_phase():
    """HTTP (fresh, and half a request), WebSocket with deflate: no --trust, no --allow."""
    fresh = WebSocketProtocol()
    assert move(fresh)._http is not None
    half = WebSocketProtocol()
    half.connection_made(Wire())  # type: ignore[arg-type]
    half.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n")
    moved = move(half)
    moved.data_received(b"\r\n")
    assert bytes(moved.transport.data).startswith(b"HTTP/1.1 404 ")
    _client, server, _wire = handshake(deflate=True)
    assert isinstance(move(server)._ws._proto.extensions[0], MovableDeflate)


# -- the property ---------------------------------------------------------------------

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
repetitive = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=20), st.integers(1, 200))
messages = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.one_of(texts, repetitive), st.integers(1, 3)),
        st.tuples(st.just("bytes"), st.binary(max_size=3000), st.integers(1, 3)),
        st.tuples(st.just("ping"), st.binary(max_size=100), st.just(1)),
    ),
    min_size=1,
    max_size=12,
)


class Recorder(WebSocketProtocol):
    """Echoes every message and keeps what it received (its state moves with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[Any] = []

    def text_received(self, text: str) -> None:
        self.got.append(text)
        self.send_text(text[::-1])

    def bytes_received(self, data: bytes) -> None:
        self.got.append(data)
        self.send_bytes(data[::-1])


def client_bytes(client: WSConnection, plan: list[tuple[str, Any, int]]) -> bytes:
    out = bytearray()
    for kind, value, parts in plan:
        if kind == "ping":
            out += client.send(Ping(payload=value))
            continue
        size = max(1, len(value) // parts)
        chunks = [value[i : i + size] for i in range(0, len(value), size)] or [value]
        for i, chunk in enumerate(chunks):
            cls = TextMessage if kind == "text" else BytesMessage
            out += client.send(cls(data=chunk, message_finished=i == len(chunks) - 1))
    out += client.send(CloseConnection(code=1000, reason="done"))
    return bytes(out)


def run(deflate: bool, plan: list[tuple[str, Any, int]], cuts: list[float]) -> tuple[Any, ...]:
    """Feed the client's bytes, moving the server at each cut (a fraction of the stream)."""
    client, server, wire = handshake(deflate)
    recorder = Recorder()
    vars(recorder).update(vars(server))
    data = client_bytes(client, plan)
    start = 0
    policy = UnpicklePolicy(allow=(__name__,))
    for cut in [*sorted({int(f * len(data)) for f in cuts}), len(data)]:
        if cut > start:
            recorder.data_received(data[start:cut])
            start = cut
        recorder = move(recorder, policy)
    client.receive_data(bytes(wire.data))
    seen: list[Any] = []
    for event in client.events():
        if isinstance(event, Message):
            seen.append((type(event).__name__, event.data, event.message_finished))
        elif isinstance(event, Pong):
            seen.append(("Pong", bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            seen.append(("Close", event.code, event.reason))
    return tuple(recorder.got), tuple(seen), wire.closed


@pytest.mark.parametrize("deflate", [True, False], ids=["deflate", "plain"])
def test_moves_at_any_byte_change_nothing(deflate):
    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(messages, st.lists(st.floats(0, 1), max_size=8))
    def check(plan, cuts):
        # The client compresses the same way both times: one run with no cut,
        # one cut everywhere asked; the outcomes must be equal.
        uncut = run(deflate, plan, [])
        moved = run(deflate, plan, cuts)
        assert moved == uncut
        expected = [v for kind, v, _ in plan if kind != "ping"]
        assert list(uncut[0]) == expected
        assert uncut[2]  # the close handshake closed the connection

    check()


# -- what cannot move says why ----------------------------------------------------------


def test_a_compressed_message_half_sent_by_the_application_refuses_clearly():
    _client, server, _wire = handshake(deflate=True)
    assert server._ws is not None
    server._write(server._ws.send(TextMessage(data="first part", message_finished=False)))
    with pytest.raises(SerializationError, match=r"half sent.*--drain"):
        dumps(server)
    server._write(server._ws.send(TextMessage(data="last part")))
    server.transport = None
    assert dumps(server).blob


def test_an_extension_takeover_does_not_know_is_refused_by_name():
    client, server, _ = handshake(deflate=False)
    assert server._ws is not None
    server._ws._proto.extensions.append(PerMessageDeflate())
    with pytest.raises(pickle.PicklingError, match=r"only takeover\.websocket's MovableDeflate"):
        _frames.freeze(server._ws)
    del client


def test_a_wsproto_with_other_attributes_is_named_not_guessed():
    conn = Connection(ConnectionType.SERVER)
    conn._proto.surprise = 1  # type: ignore[attr-defined]
    with pytest.raises(pickle.PicklingError, match=r"FrameProtocol holds \['surprise'\]"):
        _frames.freeze(conn)


def test_a_graph_may_not_smuggle_another_extension_in():
    """The recipient rebuilds wsproto objects from builtins; an extension it does not
    know is refused, and a wsproto class named in the graph is refused by the policy."""
    state = _frames.freeze(Connection(ConnectionType.SERVER))
    state["extensions"] = ["not an extension"]
    with pytest.raises(pickle.UnpicklingError, match="not a WebSocket extension"):
        _frames.thaw(state)
    blob = pickle.dumps(Connection.__new__(Connection))
    with pytest.raises(MigrationRefusedError, match=r"refused wsproto\.connection\.Connection"):
        loads(blob, [])


def test_the_server_window_moves_so_compression_goes_on_referring_back():
    """Not needed for correctness (a compressor without the window still speaks valid
    deflate) but for the ratio: a message repeated after a move is a back-reference."""
    import random

    client, server, wire = handshake(deflate=True)
    rng = random.Random(7)
    text = "".join(rng.choice("abcdefghij ") for _ in range(4000))
    assert server.send_text(text)
    first = len(wire.data)
    client.receive_data(bytes(wire.data))
    wire.data.clear()
    server = move(server)
    assert server.send_text(text)
    second = len(wire.data)
    client.receive_data(bytes(wire.data))
    assert [e.data for e in client.events()] == [text, text]  # type: ignore[attr-defined]
    assert first > 1500 and second < 100, (first, second)
