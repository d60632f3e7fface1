"""The sans-IO control protocol: frames and both sides' state machines, no sockets."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from takeover import ProtocolError
from takeover._core.protocol import (
    PROTOCOL_VERSION,
    Conversation,
    FrameDecoder,
    Kind,
    Limits,
    Message,
    Role,
    check_hello,
    encode,
    error,
    hello,
)


def raw_frame(kind: int, payload: bytes) -> bytes:
    """A frame built by hand, bypassing ``encode``'s checks."""
    return struct.pack("!BI", kind, len(payload)) + payload


def raw_payload(text: bytes, blob: bytes = b"") -> bytes:
    """A payload built by hand: JSON length, JSON text, blob."""
    return struct.pack("!I", len(text)) + text + blob


def recipient_hello(**overrides: Any) -> Message:
    message = hello(Role.RECIPIENT, pid=1234, pickle_protocol=5, python="3.11")
    message.body.update(overrides)
    return message


def originator_hello(**overrides: Any) -> Message:
    message = hello(Role.ORIGINATOR, pid=4321, pickle_protocol=5, python="3.11")
    message.body.update(overrides)
    return message


# -- frames -------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    """Each frame type decodes to the message that was encoded."""
    blob = b"\x00pickle\xff" if kind is Kind.GRAPH else b""
    message = Message(kind, {"service": "échø", "n": [1, 2.5, None, True]}, blob)
    assert FrameDecoder().feed(message.encode()) == [message]


def test_empty_body_round_trips():
    """A message with no body decodes with an empty dict."""
    assert FrameDecoder().feed(encode(Kind.LIST)) == [Message(Kind.LIST, {}, b"")]


def test_byte_by_byte_feed_yields_each_message_once_complete():
    """Fed one byte at a time, the decoder yields each message on its last byte."""
    messages = [
        recipient_hello(),
        Message(Kind.TAKE, {"service": "echo"}),
        Message(Kind.GRAPH, {"fds": 2}, bytes(range(256)) * 3),
        Message(Kind.BYE),
    ]
    stream = b"".join(m.encode() for m in messages)
    ends = set()
    position = 0
    for m in messages:
        position += len(m.encode())
        ends.add(position)
    decoder = FrameDecoder()
    received: list[Message] = []
    for index in range(len(stream)):
        out = decoder.feed(stream[index : index + 1])
        if index + 1 in ends:
            assert len(out) == 1, f"no message completed at byte {index + 1}"
        else:
            assert out == [], f"a message completed early at byte {index + 1}"
        received += out
    assert received == messages
    assert decoder.pending == 0


def test_many_frames_in_one_feed():
    """Several frames in a single chunk all come out, in order."""
    messages = [Message(Kind.LIST), Message(Kind.SERVICES, {"services": []}), Message(Kind.BYE)]
    decoder = FrameDecoder()
    data = b"".join(m.encode() for m in messages)
    assert decoder.feed(data + messages[0].encode()[:3]) == messages
    assert decoder.pending == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(
    body=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    blob=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=6),
)
def test_graph_round_trips_through_any_chunking(body, blob, cuts):
    """A GRAPH frame split at arbitrary points decodes to the same body and blob."""
    frame = encode(Kind.GRAPH, body, blob)
    points = sorted({c % (len(frame) + 1) for c in cuts} | {0, len(frame)})
    decoder = FrameDecoder()
    out: list[Message] = []
    for start, end in zip(points, points[1:]):
        out += decoder.feed(frame[start:end])
    assert out == [Message(Kind.GRAPH, body, blob)]


def test_oversized_frame_refused_from_its_header():
    """A frame longer than the limit is refused as soon as its 5-byte header arrives."""
    decoder = FrameDecoder(max_frame_size=1000)
    header = struct.pack("!BI", Kind.GRAPH, 1001)
    with pytest.raises(ProtocolError, match=r"GRAPH frame of 1001 bytes exceeds the limit of 1000"):
        decoder.feed(header)


def test_frame_at_the_limit_is_accepted():
    """A payload of exactly the limit decodes."""
    message = Message(Kind.GRAPH, {}, b"x" * 100)
    limit = len(message.encode()) - 5
    assert FrameDecoder(max_frame_size=limit).feed(message.encode()) == [message]


def test_unknown_frame_type_refused():
    """A type byte outside the known kinds is a ProtocolError naming the number."""
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        FrameDecoder().feed(raw_frame(99, raw_payload(b"{}")))


def test_unknown_frame_type_refused_from_header_alone():
    """The type byte is checked before the rest of the frame has arrived."""
    with pytest.raises(ProtocolError, match="unknown frame type 0"):
        FrameDecoder().feed(struct.pack("!BI", 0, 10))


def test_payload_too_short_for_json_length_refused():
    """A payload that cannot hold the 4-byte JSON length is refused."""
    with pytest.raises(ProtocolError, match="too short"):
        FrameDecoder().feed(raw_frame(Kind.LIST, b"\x00\x00"))


def test_truncated_body_refused():
    """A JSON length running past the end of the frame is refused."""
    payload = struct.pack("!I", 50) + b'{"a":1}'
    with pytest.raises(ProtocolError, match="overruns the frame"):
        FrameDecoder().feed(raw_frame(Kind.TAKE, payload))


def test_incomplete_frame_waits_and_is_pending():
    """Half a frame yields nothing and is counted as pending."""
    frame = encode(Kind.TAKE, {"service": "echo"})
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe{}", b""])
def test_non_json_body_refused(text):
    """A body that is not UTF-8 JSON is a ProtocolError."""
    with pytest.raises(ProtocolError, match="LIST frame body is not JSON"):
        FrameDecoder().feed(raw_frame(Kind.LIST, raw_payload(text)))


@pytest.mark.parametrize("text", [b"[1,2]", b'"hello"', b"3", b"null", b"true"])
def test_non_object_json_body_refused(text):
    """Valid JSON that is not an object is a ProtocolError."""
    with pytest.raises(ProtocolError, match="not a JSON object"):
        FrameDecoder().feed(raw_frame(Kind.SERVICES, raw_payload(text)))


@pytest.mark.parametrize("kind", [k for k in Kind if k is not Kind.GRAPH])
def test_blob_on_non_graph_frame_refused(kind):
    """Only GRAPH frames may carry bytes after the JSON body."""
    with pytest.raises(ProtocolError, match=f"{kind.name} frame carries 3 unexpected bytes"):
        FrameDecoder().feed(raw_frame(kind, raw_payload(b"{}", b"abc")))


def test_error_message_builder():
    """``error`` builds an ERROR frame with a code and a message."""
    message = error("busy", "service 'echo' is busy")
    assert message.kind is Kind.ERROR
    assert message.body == {"code": "busy", "message": "service 'echo' is busy"}


# -- conversations ------------------------------------------------------------


def arbiter(ahead: int) -> Message:
    """The first FDS frame of a move: the arbiter, announcing ``ahead`` sockets."""
    return Message(Kind.FDS, {"count": 1, "arbiter": True, "ahead": ahead})


def batch(count: int, twins: str | None = None, flag: int = 0) -> Message:
    """A batch of ``count`` TCP sockets sent ahead (with twins of kind ``twins``)."""
    body: dict[str, Any] = {"count": count, "kinds": [[count, 2, 1, 6, flag]]}
    if twins is not None:
        body["twins"] = twins
    return Message(Kind.FDS, body)


def graph(fds: int, ahead: int = 0, twins: bool = False) -> Message:
    """A GRAPH announcing ``fds`` descriptors after it, ``ahead`` sent before it."""
    return Message(Kind.GRAPH, {"fds": fds, "ahead": ahead, "twins": twins}, b"\x80\x05blob")


class ConversationPair:
    """An originator and a recipient wired back to back, in the spirit of h11's ConnectionPair.

    ``send(role, message)`` has that side validate and frame the message, then
    decodes the bytes on the other side and has it validate them too.
    """

    def __init__(self, recipient_limits: Limits = Limits()) -> None:
        self.sides = {
            Role.ORIGINATOR: Conversation(Role.ORIGINATOR),
            Role.RECIPIENT: Conversation(Role.RECIPIENT, recipient_limits),
        }
        self.decoders = {role: FrameDecoder() for role in Role}

    @property
    def originator(self) -> Conversation:
        return self.sides[Role.ORIGINATOR]

    @property
    def recipient(self) -> Conversation:
        return self.sides[Role.RECIPIENT]

    def send(self, role: Role, message: Message) -> Message:
        other = Role.RECIPIENT if role is Role.ORIGINATOR else Role.ORIGINATOR
        data = self.sides[role].send(message)
        (received,) = self.decoders[other].feed(data)
        assert received == message
        self.sides[other].receive(received)
        return received

    def states(self) -> tuple[str, str]:
        return (self.originator.state, self.recipient.state)

    def ready_ahead(self, ahead: int = 0) -> None:
        """The arbiter announcing ``ahead`` sockets, those sockets, and AHEAD_READY."""
        self.send(Role.ORIGINATOR, arbiter(ahead))
        if ahead:
            self.send(Role.ORIGINATOR, batch(ahead))
        self.send(Role.RECIPIENT, Message(Kind.AHEAD_READY, {"count": ahead}))

    def handshake(self) -> None:
        self.send(Role.RECIPIENT, recipient_hello())
        self.send(Role.ORIGINATOR, originator_hello())

    def take(self, fds: int) -> None:
        """TAKE, the arbiter, AHEAD_READY, GRAPH (announcing ``fds``), then the FDS frames."""
        self.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
        self.ready_ahead()
        self.send(Role.ORIGINATOR, graph(fds))
        while fds:
            count = min(fds, 253)
            self.send(Role.ORIGINATOR, Message(Kind.FDS, {"count": count}))
            fds -= count


def test_whole_conversation_both_sides_agree():
    """HELLOs, LIST, TAKE, GRAPH, FDS frames, COMMITTED, BYE: both sides agree."""
    pair = ConversationPair()
    assert pair.states() == ("start", "start")
    pair.send(Role.RECIPIENT, recipient_hello())
    assert pair.states() == ("hello-received", "hello-received")
    pair.send(Role.ORIGINATOR, originator_hello())
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.LIST))
    assert pair.states() == ("listing", "listing")
    pair.send(Role.ORIGINATOR, Message(Kind.SERVICES, {"services": [{"name": "echo"}]}))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    assert pair.states() == ("taking", "taking")
    pair.send(Role.ORIGINATOR, arbiter(2))
    pair.send(Role.ORIGINATOR, batch(2, "asyncio", flag=1))
    assert pair.states() == ("taking", "taking")
    assert pair.originator.move == pair.recipient.move
    pair.send(Role.RECIPIENT, Message(Kind.AHEAD_READY, {"count": 2}))
    assert pair.states() == ("ahead-ready", "ahead-ready")
    pair.send(Role.ORIGINATOR, graph(600, ahead=2, twins=True))
    assert pair.states() == ("sending-fds", "sending-fds")
    assert pair.originator.fds_expected == pair.recipient.fds_expected == 600
    for count, left in ((253, 347), (253, 94)):
        pair.send(Role.ORIGINATOR, Message(Kind.FDS, {"count": count}))
        assert pair.states() == ("sending-fds", "sending-fds")
        assert pair.originator.fds_expected == pair.recipient.fds_expected == left
    pair.send(Role.ORIGINATOR, Message(Kind.FDS, {"count": 94}))
    assert pair.states() == ("await-committed", "await-committed")
    pair.send(Role.RECIPIENT, Message(Kind.COMMITTED, {"service": "echo"}))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.BYE))
    assert pair.states() == ("closed", "closed")


def test_graph_without_fds_goes_straight_to_await_committed():
    """A GRAPH announcing no descriptors is followed by COMMITTED, with no FDS frame."""
    pair = ConversationPair()
    pair.handshake()
    pair.take(fds=0)
    assert pair.states() == ("await-committed", "await-committed")


def test_two_services_move_on_one_channel():
    """After one move commits, the same channel can take another service."""
    pair = ConversationPair()
    pair.handshake()
    for fds in (3, 1):
        pair.take(fds)
        pair.send(Role.RECIPIENT, Message(Kind.COMMITTED))
        assert pair.states() == ("idle", "idle")


def test_refused_graph_returns_both_sides_to_idle():
    """REFUSED instead of COMMITTED rolls back to idle; a new TAKE is allowed."""
    pair = ConversationPair()
    pair.handshake()
    pair.take(fds=2)
    pair.send(Role.RECIPIENT, Message(Kind.REFUSED, {"reason": "cannot import app.Echo"}))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    assert pair.states() == ("taking", "taking")


def test_error_after_ahead_ready_returns_to_idle():
    """ERROR after AHEAD_READY (the service could not be paused or pickled) leaves the
    channel usable."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    pair.ready_ahead()
    pair.send(Role.ORIGINATOR, error("serialization", "cannot pickle"))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    assert pair.states() == ("taking", "taking")


def test_error_answering_take_returns_to_idle():
    """ERROR in answer to TAKE (busy, no such service) leaves the channel usable."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "nosuch"}))
    pair.send(Role.ORIGINATOR, error("no-such-service", "no service named 'nosuch'"))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, Message(Kind.LIST))
    assert pair.states() == ("listing", "listing")


@pytest.mark.parametrize("step", ["start", "hello-received", "sending-fds", "await-committed"])
def test_originator_error_elsewhere_closes(step):
    """An ERROR from the originator at any other step closes the conversation."""
    pair = ConversationPair()
    if step != "start":
        pair.send(Role.RECIPIENT, recipient_hello())
    if step == "sending-fds":
        pair.send(Role.ORIGINATOR, originator_hello())
        pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
        pair.ready_ahead()
        pair.send(Role.ORIGINATOR, graph(5))
    if step == "await-committed":
        pair.send(Role.ORIGINATOR, originator_hello())
        pair.take(fds=0)
    assert pair.states() == (step, step)
    pair.send(Role.ORIGINATOR, error("permission", "refused"))
    assert pair.states() == ("closed", "closed")


def test_recipient_may_not_send_error():
    """ERROR is the originator's word; from the recipient it is out of turn."""
    pair = ConversationPair()
    pair.handshake()
    with pytest.raises(ProtocolError, match="unexpected ERROR from the recipient in state 'idle'"):
        pair.send(Role.RECIPIENT, error("oops", "no"))


@pytest.mark.parametrize("role", list(Role))
def test_bye_from_either_side_closes(role):
    """BYE closes the conversation whoever says it, in any state."""
    pair = ConversationPair()
    pair.handshake()
    pair.take(fds=4)
    pair.send(role, Message(Kind.BYE))
    assert pair.states() == ("closed", "closed")


def test_nothing_but_bye_after_close():
    """Once closed, any message other than BYE is out of turn."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.BYE))
    with pytest.raises(ProtocolError, match="in state 'closed'"):
        pair.send(Role.RECIPIENT, Message(Kind.LIST))


def _conversation_in(state: str, role: Role) -> Conversation:
    """A conversation of ``role`` driven to ``state`` through a pair."""
    pair = ConversationPair()
    steps = {
        "start": [],
        "idle": ["hello"],
        "taking": ["hello", "take"],
        "ahead-ready": ["hello", "take", "ahead"],
        "sending-fds": ["hello", "take", "ahead", "graph"],
        "await-committed": ["hello", "take", "ahead", "graph", "fds"],
    }[state]
    for step in steps:
        if step == "hello":
            pair.handshake()
        elif step == "take":
            pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
        elif step == "ahead":
            pair.ready_ahead()
        elif step == "graph":
            pair.send(Role.ORIGINATOR, graph(2))
        elif step == "fds":
            pair.send(Role.ORIGINATOR, Message(Kind.FDS, {"count": 2}))
    assert pair.states() == (state, state)
    return pair.sides[role]


OUT_OF_TURN = [
    # (state, who sends it, kind)
    ("start", Role.RECIPIENT, Kind.TAKE),
    ("start", Role.ORIGINATOR, Kind.HELLO),
    ("idle", Role.RECIPIENT, Kind.HELLO),
    ("idle", Role.RECIPIENT, Kind.COMMITTED),
    ("idle", Role.ORIGINATOR, Kind.GRAPH),
    ("taking", Role.RECIPIENT, Kind.TAKE),
    ("taking", Role.RECIPIENT, Kind.FDS),
    ("sending-fds", Role.RECIPIENT, Kind.COMMITTED),
    ("sending-fds", Role.RECIPIENT, Kind.REFUSED),
    ("await-committed", Role.ORIGINATOR, Kind.FDS),
    ("await-committed", Role.ORIGINATOR, Kind.GRAPH),
    ("await-committed", Role.RECIPIENT, Kind.TAKE),
    # Right kind, wrong direction.
    ("idle", Role.ORIGINATOR, Kind.LIST),
    ("taking", Role.RECIPIENT, Kind.GRAPH),
    ("taking", Role.ORIGINATOR, Kind.GRAPH),  # before the recipient said AHEAD_READY
    ("ahead-ready", Role.RECIPIENT, Kind.AHEAD_READY),
    ("ahead-ready", Role.ORIGINATOR, Kind.FDS),
    ("idle", Role.RECIPIENT, Kind.AHEAD_READY),
]


@pytest.mark.parametrize(("state", "sender", "kind"), OUT_OF_TURN)
@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_out_of_turn_message_rejected_naming_the_state(state, sender, kind, side):
    """A message out of turn is refused by the side sending it and the side receiving it."""
    receiver = Role.RECIPIENT if sender is Role.ORIGINATOR else Role.ORIGINATOR
    body: dict[str, Any] = {"count": 1} if kind is Kind.FDS else {"fds": 0}
    message = Message(kind, body)
    expected = f"unexpected {kind.name} from the {sender.value} in state {state!r}"
    if side == "sender":
        conversation = _conversation_in(state, sender)
        with pytest.raises(ProtocolError, match=expected):
            conversation.send(message)
    else:
        conversation = _conversation_in(state, receiver)
        with pytest.raises(ProtocolError, match=expected):
            conversation.receive(message)
    assert conversation.state == state


def test_fds_beyond_the_announced_count_refused():
    """An FDS frame carrying more descriptors than are still announced is refused."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    pair.ready_ahead()
    pair.send(Role.ORIGINATOR, graph(5))
    pair.send(Role.ORIGINATOR, Message(Kind.FDS, {"count": 3}))
    with pytest.raises(ProtocolError, match="FDS frame carries 3 descriptors, 2 were announced"):
        pair.recipient.receive(Message(Kind.FDS, {"count": 3}))
    assert pair.recipient.state == "sending-fds"
    assert pair.recipient.fds_expected == 2


def test_empty_fds_frame_refused():
    """An FDS frame carrying no descriptors is refused."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    pair.ready_ahead()
    pair.send(Role.ORIGINATOR, graph(1))
    with pytest.raises(ProtocolError, match="carries 0 descriptors"):
        pair.recipient.receive(Message(Kind.FDS, {"count": 0}))


@pytest.mark.parametrize("value", [-1, "2", 2.0, True, None, [2]])
def test_graph_fd_count_must_be_a_non_negative_integer(value):
    """GRAPH's ``fds`` must be a non-negative int (not a bool, string or float)."""
    conversation = _conversation_in("ahead-ready", Role.RECIPIENT)
    body = {"ahead": 0, "twins": False} if value is None else {"fds": value, "ahead": 0}
    with pytest.raises(ProtocolError, match="'fds' must be a non-negative integer"):
        conversation.receive(Message(Kind.GRAPH, body))
    assert conversation.state == "ahead-ready"


@pytest.mark.parametrize("value", [-1, "1", True, None])
def test_fds_count_must_be_a_non_negative_integer(value):
    """FDS's ``count`` must be a non-negative int."""
    conversation = _conversation_in("sending-fds", Role.RECIPIENT)
    with pytest.raises(ProtocolError, match="'count' must be a non-negative integer"):
        conversation.receive(Message(Kind.FDS, {"count": value}))
    assert conversation.fds_expected == 2


# -- hello --------------------------------------------------------------------


def test_hello_carries_version_role_and_extras():
    """``hello`` fills in the protocol version and role, and keeps extra fields."""
    message = hello(Role.ORIGINATOR, pid=7, pickle_protocol=4, python="3.13", implementation="pypy")
    assert message.body == {
        "protocol": PROTOCOL_VERSION,
        "role": "originator",
        "pid": 7,
        "pickle_protocol": 4,
        "python": "3.13",
        "implementation": "pypy",
    }
    assert json.loads(json.dumps(message.body)) == message.body


def test_check_hello_accepts_a_good_hello():
    """A well-formed HELLO from the expected role is returned as its body."""
    assert check_hello(recipient_hello(), Role.RECIPIENT)["pid"] == 1234


def test_check_hello_rejects_wrong_version():
    """A peer speaking another protocol version is refused, naming both versions."""
    with pytest.raises(
        ProtocolError, match=rf"control protocol 99, this side speaks {PROTOCOL_VERSION}"
    ):
        check_hello(recipient_hello(protocol=99), Role.RECIPIENT)


def test_check_hello_rejects_missing_version():
    """A HELLO with no protocol version is refused."""
    message = recipient_hello()
    del message.body["protocol"]
    with pytest.raises(ProtocolError, match="control protocol None"):
        check_hello(message, Role.RECIPIENT)


def test_check_hello_rejects_wrong_role():
    """A recipient talking to a recipient (or an originator to an originator) is refused."""
    with pytest.raises(
        ProtocolError, match="peer says its role is 'recipient'; expected 'originator'"
    ):
        check_hello(recipient_hello(), Role.ORIGINATOR)


def test_check_hello_rejects_other_kinds():
    """Something other than HELLO where HELLO is due is refused."""
    with pytest.raises(ProtocolError, match="expected HELLO, got LIST"):
        check_hello(Message(Kind.LIST), Role.RECIPIENT)


@pytest.mark.parametrize(("key", "value"), [("pid", -5), ("pid", "12"), ("pickle_protocol", None)])
def test_check_hello_rejects_bad_numbers(key, value):
    """pid and pickle_protocol must be non-negative integers."""
    with pytest.raises(ProtocolError, match=f"'{key}' must be a non-negative integer"):
        check_hello(recipient_hello(**{key: value}), Role.RECIPIENT)


def test_descriptors_may_go_ahead_of_the_graph():
    """FDS frames before GRAPH (the arbiter, the sockets the dry run found) keep the state."""
    for role in (Role.ORIGINATOR, Role.RECIPIENT):
        conversation = _conversation_in("taking", role)
        advance = conversation.send if role is Role.ORIGINATOR else conversation.receive
        advance(arbiter(4))
        advance(batch(3, "asyncio", flag=1))
        assert conversation.state == "taking"
        assert conversation.move is not None and conversation.move.ahead_sent == 3
        with pytest.raises(ProtocolError, match="ahead of the graph carries no descriptors"):
            advance(Message(Kind.FDS, {"count": 0, "kinds": []}))


# -- the rules of a move, on both sides -----------------------------------------


def _taking(role: Role) -> tuple[Conversation, Any]:
    """A conversation of ``role`` in state ``taking``, and how it takes the originator's frames."""
    conversation = _conversation_in("taking", role)
    return conversation, (conversation.send if role is Role.ORIGINATOR else conversation.receive)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    "body",
    [
        {"count": 2, "kinds": [[2, 2, 1, 6, 0]]},  # sockets before the arbiter
        {"count": 2, "arbiter": True, "ahead": 3},  # the arbiter with company
        {"count": 1, "arbiter": True},  # the arbiter says nothing of what follows
        {"count": 1, "arbiter": True, "ahead": -1},
    ],
)
def test_the_first_descriptor_of_a_move_is_its_arbiter_alone(role, body):
    """Both sides refuse a move whose first FDS frame is not the arbiter, alone, with a count."""
    conversation, advance = _taking(role)
    with pytest.raises(ProtocolError, match=r"arbiter|'ahead' must be"):
        advance(Message(Kind.FDS, body))
    assert conversation.state == "taking" and conversation.move.ahead is None


@pytest.mark.parametrize("role", list(Role))
def test_no_more_sockets_ahead_than_the_arbiter_announced(role):
    """A batch beyond the count the arbiter announced is refused; the count stays."""
    conversation, advance = _taking(role)
    advance(arbiter(3))
    advance(batch(2))
    with pytest.raises(
        ProtocolError, match="4 sockets sent ahead of the graph of 'echo', the arbiter announced 3"
    ):
        advance(batch(2))
    assert conversation.move.ahead_sent == 2


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    "kinds",
    [
        None,
        [[3, 2, 1, 6, 0]],
        [[1, 2, 1, 6, 2]],
        [[0, 2, 1, 6, 0], [1, 2, 1, 6, 0]],
        [[1, 2, "1", 6, 0]],
    ],
)
def test_each_batch_sent_ahead_is_described_by_its_kinds(role, kinds):
    """Kinds that are missing, malformed or that count other than the batch are refused."""
    conversation, advance = _taking(role)
    advance(arbiter(5))
    with pytest.raises(ProtocolError, match="socket kinds"):
        advance(Message(Kind.FDS, {"count": 1, "kinds": kinds}))
    assert conversation.move.ahead_sent == 0


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    ("first", "second"), [("asyncio", None), (None, "asyncio"), ("asyncio", "x")]
)
def test_batches_sent_ahead_agree_on_their_twins(role, first, second):
    """Every batch sent ahead names the same kind of twin (or none)."""
    _conversation, advance = _taking(role)
    advance(arbiter(2))
    advance(batch(1, first))
    with pytest.raises(ProtocolError, match="disagree on their twins"):
        advance(batch(1, second))


@pytest.mark.parametrize("role", list(Role))
def test_the_twins_kind_is_a_name(role):
    """A kind of twin that is not a string is refused."""
    _conversation, advance = _taking(role)
    advance(arbiter(1))
    with pytest.raises(ProtocolError, match="'twins' must name a kind of twin"):
        advance(Message(Kind.FDS, {"count": 1, "kinds": [[1, 2, 1, 6, 1]], "twins": 7}))


@pytest.mark.parametrize("receiver", list(Role))
@pytest.mark.parametrize(("sent", "count"), [(None, 0), (1, 1), (2, 1), (2, 3)])
def test_ahead_ready_comes_after_every_socket_and_counts_them(receiver, sent, count):
    """AHEAD_READY before the arbiter, before the last batch, or with the wrong count is refused."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    if sent is not None:
        pair.send(Role.ORIGINATOR, arbiter(2))
        pair.send(Role.ORIGINATOR, batch(sent))
    message = Message(Kind.AHEAD_READY, {"count": count})
    with pytest.raises(ProtocolError, match="sockets sent ahead are ready"):
        if receiver is Role.ORIGINATOR:
            pair.originator.receive(message)
        else:
            pair.recipient.send(message)
    assert pair.states() == ("taking", "taking")


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            {"fds": 0, "ahead": 1, "twins": True},
            "the graph counts 1 sockets sent ahead, 2 were sent",
        ),
        ({"fds": 0, "twins": True}, "the graph counts None sockets sent ahead"),
        ({"fds": 0, "ahead": 2, "twins": False}, "the graph says twins: False"),
        ({"fds": 0, "ahead": 2}, "the graph says twins: None"),
    ],
)
def test_the_graph_agrees_with_what_was_sent_ahead(role, body, error):
    """GRAPH must count the sockets sent ahead and say whether they had twins, as sent."""
    pair = ConversationPair()
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    pair.send(Role.ORIGINATOR, arbiter(2))
    pair.send(Role.ORIGINATOR, batch(2, "asyncio", flag=1))
    pair.send(Role.RECIPIENT, Message(Kind.AHEAD_READY, {"count": 2}))
    conversation = pair.sides[role]
    advance = conversation.send if role is Role.ORIGINATOR else conversation.receive
    with pytest.raises(ProtocolError, match=error):
        advance(Message(Kind.GRAPH, body, b"blob"))
    assert conversation.state == "ahead-ready"


def test_a_move_brings_at_most_max_fds_descriptors():
    """The arbiter's count, and the graph's, are held to the receiving side's limit."""
    pair = ConversationPair(recipient_limits=Limits(max_fds=10))
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    with pytest.raises(ProtocolError, match="service 'echo' holds 11 descriptors; the limit is 10"):
        pair.send(Role.ORIGINATOR, arbiter(10))
    assert pair.recipient.move.ahead is None

    pair = ConversationPair(recipient_limits=Limits(max_fds=10))
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo"}))
    pair.ready_ahead(6)
    with pytest.raises(ProtocolError, match="holds 11 descriptors; the limit is 10"):
        pair.recipient.receive(graph(4, ahead=6))
    pair.send(Role.ORIGINATOR, graph(3, ahead=6))
    assert pair.recipient.state == "sending-fds" and pair.recipient.fds_expected == 3


def test_fd_limit_refusal_names_the_service_and_the_limit():
    """What an originator says when a move is over its own limit."""
    conversation = _conversation_in("taking", Role.ORIGINATOR)
    conversation.limits = Limits(max_fds=5)
    assert conversation.fd_limit_refusal(5) is None
    assert conversation.fd_limit_refusal(6) == "service 'echo' holds 6 descriptors; the limit is 5"


@pytest.mark.parametrize("kind", [Kind.TAKE, Kind.CHECK])
def test_take_and_check_name_a_service(kind):
    """TAKE and CHECK without a service name are refused by both sides."""
    for role in Role:
        conversation = _conversation_in("idle", role)
        advance = conversation.receive if role is Role.ORIGINATOR else conversation.send
        with pytest.raises(ProtocolError, match="'service' must be a string"):
            advance(Message(kind, {"service": 3}))
        assert conversation.state == "idle"


# -- a move across hosts (docs/crosshost.md) -------------------------------------------


def cross_take(pair: ConversationPair) -> None:
    pair.handshake()
    pair.send(Role.RECIPIENT, Message(Kind.TAKE, {"service": "echo", "cross_host": True}))
    assert pair.originator.move is not None and pair.originator.move.cross_host


def cross_graph(fds: int = 0) -> Message:
    return Message(Kind.GRAPH, {"fds": fds, "ahead": 0, "cross_host": True}, b"\x80\x05blob")


def test_move_across_hosts_both_sides_agree():
    """TAKE (cross_host), GRAPH without descriptors, READY, COMMIT, COMMITTED; then
    the channel takes another service."""
    pair = ConversationPair()
    cross_take(pair)
    pair.send(Role.ORIGINATOR, cross_graph())
    assert pair.states() == ("await-ready", "await-ready")
    pair.send(Role.RECIPIENT, Message(Kind.READY, {"service": "echo", "count": 3}))
    assert pair.states() == ("ready", "ready")
    pair.send(Role.ORIGINATOR, Message(Kind.COMMIT, {"service": "echo"}))
    assert pair.states() == ("await-committed", "await-committed")
    pair.send(Role.RECIPIENT, Message(Kind.COMMITTED, {"service": "echo"}))
    assert pair.states() == ("idle", "idle")
    pair.take(fds=1)  # a same-host move next, on the same channel
    assert pair.states() == ("await-committed", "await-committed")


@pytest.mark.parametrize("refusal", ["refused", "error-after-ready", "error-before-graph"])
def test_move_across_hosts_rolled_back_returns_to_idle(refusal):
    pair = ConversationPair()
    cross_take(pair)
    if refusal == "error-before-graph":
        pair.send(Role.ORIGINATOR, error("not-permitted", "needs CAP_NET_ADMIN"))
    else:
        pair.send(Role.ORIGINATOR, cross_graph())
        if refusal == "refused":
            pair.send(Role.RECIPIENT, Message(Kind.REFUSED, {"reason": "no"}))
        else:
            pair.send(Role.RECIPIENT, Message(Kind.READY, {"service": "echo"}))
            pair.send(Role.ORIGINATOR, error("rolled-back", "the release hook failed"))
    assert pair.states() == ("idle", "idle")


def test_move_across_hosts_carries_no_descriptors():
    """No FDS frame, no GRAPH announcing descriptors, no arbiter: a ProtocolError."""
    for message in (arbiter(0), batch(1)):
        pair = ConversationPair()
        cross_take(pair)
        with pytest.raises(ProtocolError):
            pair.originator.send(message)
    pair = ConversationPair()
    cross_take(pair)
    with pytest.raises(ProtocolError, match="without descriptors"):
        pair.originator.send(cross_graph(fds=2))
    with pytest.raises(ProtocolError, match="without descriptors"):
        pair.originator.send(graph(0))  # not marked cross_host


def test_commit_and_ready_only_in_a_move_across_hosts():
    pair = ConversationPair()
    pair.handshake()
    pair.take(fds=0)
    with pytest.raises(ProtocolError, match="unexpected READY"):
        pair.recipient.send(Message(Kind.READY, {"service": "echo"}))
    with pytest.raises(ProtocolError, match="unexpected COMMIT"):
        pair.originator.send(Message(Kind.COMMIT, {"service": "echo"}))
    pair = ConversationPair()
    cross_take(pair)
    pair.send(Role.ORIGINATOR, cross_graph())
    with pytest.raises(ProtocolError, match="unexpected COMMIT"):
        pair.originator.send(Message(Kind.COMMIT, {"service": "echo"}))  # before READY


@pytest.mark.parametrize("answer", ["commit", "error"])
def test_outcome_asked_on_a_new_connection(answer):
    """A recipient in doubt asks OUTCOME {service, move} on a fresh, authenticated
    conversation; the originator answers COMMIT or ERROR, and both are idle again
    (the same connection may ask again)."""
    pair = ConversationPair()
    pair.handshake()
    ask = Message(Kind.OUTCOME, {"service": "echo", "move": "0123abcd"})
    pair.send(Role.RECIPIENT, ask)
    assert pair.states() == ("outcome", "outcome")
    if answer == "commit":
        pair.send(Role.ORIGINATOR, Message(Kind.COMMIT, {"service": "echo", "move": "0123abcd"}))
    else:
        pair.send(Role.ORIGINATOR, error("rolled-back", "the move was rolled back here"))
    assert pair.states() == ("idle", "idle")
    pair.send(Role.RECIPIENT, ask)
    assert pair.states() == ("outcome", "outcome")


def test_outcome_names_its_move_and_comes_only_when_idle():
    pair = ConversationPair()
    pair.handshake()
    with pytest.raises(ProtocolError, match="'move' must be a string"):
        pair.recipient.send(Message(Kind.OUTCOME, {"service": "echo"}))
    with pytest.raises(ProtocolError, match="unexpected COMMIT"):
        pair.originator.send(Message(Kind.COMMIT, {"service": "echo"}))  # nobody asked
    pair = ConversationPair()
    cross_take(pair)
    with pytest.raises(ProtocolError, match="unexpected OUTCOME"):
        pair.recipient.send(Message(Kind.OUTCOME, {"service": "echo", "move": "x"}))
    pair = ConversationPair()
    with pytest.raises(ProtocolError, match="unexpected OUTCOME"):
        pair.recipient.send(Message(Kind.OUTCOME, {"service": "echo", "move": "x"}))  # no HELLO
