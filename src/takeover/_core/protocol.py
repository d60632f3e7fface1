"""The control protocol, with no I/O.

Bytes go in, messages come out; messages go in, bytes come out. Nothing here
touches a socket, an event loop or pickle: the runtimes move the bytes and the
descriptors, ``pickling`` makes the graph blob, and this module only frames
messages and checks that each side says the right thing at the right time.

Frames
------
Every frame is ``type (1 byte) | length (4 bytes, big-endian) | payload``.
A payload is ``json length (4 bytes) | UTF-8 JSON object | blob``; only GRAPH
carries a blob (the pickled service graph). JSON is for everything a peer
says before it is trusted with pickle: a malformed frame is a
``ProtocolError``, never an unpickling.

The conversation
----------------
The recipient connects and speaks first. Written from the originator's side
(the recipient's machine is the same table with the directions swapped)::

    start           --in HELLO-->        hello-received
    hello-received  --out HELLO-->       idle              (no secret configured)
    hello-received  --out HELLO-->       authenticating    (HELLO says "auth")
    authenticating  --in AUTH-->         auth-check        (the recipient's proof)
    auth-check      --out AUTHED-->      idle              (or ERROR, and close)
    idle            --in LIST-->         listing  --out SERVICES--> idle
    idle            --in TAKE-->         taking
    idle            --in CHECK-->        checking          (a dry run: nothing is paused)
    checking        --out CHECKED-->     idle              (can it move; if not, what is in the way)
    checking        --out ERROR-->       idle              (no such service)
    taking          --out ERROR-->       idle              (busy, no such service, unpicklable)
    taking          --out FDS-->         taking            (sent ahead of the graph: the arbiter,
                                                            which says how many sockets follow,
                                                            then the sockets the dry run found)
    taking          --in AHEAD_READY-->  ahead-ready       (all built and registered: pause now)
    ahead-ready     --out ERROR-->       idle              (could not pause or pickle it)
    ahead-ready     --out GRAPH-->       sending-fds       (GRAPH says how many fds follow)
    sending-fds     --out FDS-->         sending-fds ... await-committed once all are sent
    await-committed --in COMMITTED-->    idle              (the service has moved)
    await-committed --in REFUSED-->      idle              (rolled back: the recipient could not
                                                            adopt it, or found ROLLED_BACK)
    any             --either BYE-->      closed

A move across hosts (TAKE says ``"cross_host": true``; docs/crosshost.md) has
no descriptors and no arbiter: the originator decides, and says so::

    taking          --out ERROR-->       idle              (not permitted, unpicklable...)
    taking          --out GRAPH-->       await-ready       (connections as TCP_REPAIR state)
    await-ready     --in READY-->        ready             (rebuilt in repair mode, adopted)
    await-ready     --in REFUSED-->      idle              (rolled back: the originator thaws)
    ready           --out COMMIT-->      await-committed   (the originator has let go)
    ready           --out ERROR-->       idle              (rolled back after all)
    await-committed --in COMMITTED-->    idle              (started there)

A recipient that lost the channel after READY (before COMMIT reached it)
asks the originator what it decided, on a new, authenticated connection::

    idle            --in OUTCOME-->      outcome           (which move: GRAPH's "move")
    outcome         --out COMMIT-->      idle              (committed: start the copies)
    outcome         --out ERROR-->       idle              (rolled back, or not known here)

ERROR may also be sent in ``start`` and ``hello-received`` (authentication
refused), after which the channel closes. The commit point is not a frame but
the move's arbiter (``arbiter.py``), a byte both processes share and decide
once: the recipient, once it has rebuilt and adopted the graph, records
COMMITTED there, starts and answers COMMITTED; the originator records
ROLLED_BACK there before it resumes for any reason (a refusal, a timeout, a
broken channel), and whichever side is first wins. So the originator releases
its copies only once the recipient owns the service, and a move costs one
trip between the processes after the graph.

The rules of a move
-------------------
From TAKE until the move is over, both sides keep the same account of it
(:class:`Move`) and refuse, with a ``ProtocolError``, a frame that breaks one
of these rules, whichever side sends it:

* the first descriptor of a move is its arbiter, alone in its FDS frame,
  which says how many sockets are sent ahead of the graph;
* the batches sent ahead carry no more sockets than that, each described by
  its kinds, and agree on the kind of their twins;
* AHEAD_READY comes once every socket sent ahead has, and counts them all;
* GRAPH counts the sockets sent ahead as they were sent, says whether they
  have twins as they did, and announces how many descriptors follow it;
* the FDS frames after GRAPH carry exactly what it announced;
* a move brings at most ``Limits.max_fds`` descriptors, the arbiter included.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

PROTOCOL_VERSION = 2
"""The version of this control protocol; HELLO refuses a peer that speaks another."""
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024

DEFAULT_STEP_TIMEOUT = 30.0
HANDSHAKE_FRAME_LIMIT = 64 * 1024
"""The largest frame accepted before the peer has authenticated."""
DEFAULT_MAX_FDS = 1_000_000
DEFAULT_IN_DOUBT_WAIT = 60.0
"""Seconds a recipient that lost the channel after READY in a move across hosts
keeps asking the originator what it decided (OUTCOME) before it presumes a
rollback; TAKE says it, and the originator waits as long to be asked. The
clients' TCP retransmits meanwhile: they see a longer pause, not an error."""

_HEADER = struct.Struct("!BI")
_JSON_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Limits:
    """What one side accepts from the other.

    Attributes:
        max_frame_size: the largest frame payload, in bytes.
        max_fds: the most descriptors one service may bring.
        step_timeout: seconds a side waits for the peer's next step while a
            service is in transit (None: forever).
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_fds: int = DEFAULT_MAX_FDS
    step_timeout: float | None = DEFAULT_STEP_TIMEOUT


class Kind(enum.IntEnum):
    """Frame types."""

    HELLO = 1
    LIST = 2
    SERVICES = 3
    TAKE = 4
    GRAPH = 5
    FDS = 6
    # 7 and 9 are not used: a peer that sends them is refused as any unknown type.
    REFUSED = 8
    COMMITTED = 10
    ERROR = 11
    BYE = 12
    CHECK = 13
    CHECKED = 14
    AHEAD_READY = 15
    # A move across hosts (TCP_REPAIR, see docs/crosshost.md).
    READY = 16
    COMMIT = 17
    OUTCOME = 18
    AUTH = 20
    AUTHED = 21


class Role(enum.Enum):
    ORIGINATOR = "originator"
    RECIPIENT = "recipient"


@dataclass
class Message:
    """One frame: its kind, its JSON body and, for GRAPH, the blob."""

    kind: Kind
    body: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""

    def encode(self) -> bytes:
        """The frame's bytes."""
        return encode(self.kind, self.body, self.blob)


def encode(kind: Kind, body: dict[str, Any] | None = None, blob: bytes = b"") -> bytes:
    """Frame a message."""
    text = json.dumps(body or {}, separators=(",", ":")).encode()
    payload_length = _JSON_LENGTH.size + len(text) + len(blob)
    return b"".join((_HEADER.pack(kind, payload_length), _JSON_LENGTH.pack(len(text)), text, blob))


class FrameDecoder:
    """Turns a byte stream into messages, refusing anything malformed.

    Args:
        max_frame_size: the largest payload accepted; a bigger one is a
            ``ProtocolError`` raised from its header, before it is buffered.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        """Add ``data`` and return every message it completed."""
        self._buffer += data
        return list(self._drain())

    def _drain(self) -> Iterator[Message]:
        while len(self._buffer) >= _HEADER.size:
            kind_number, length = _HEADER.unpack_from(self._buffer)
            try:
                kind = Kind(kind_number)
            except ValueError:
                raise ProtocolError(f"unknown frame type {kind_number}") from None
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"{kind.name} frame of {length} bytes exceeds the limit of "
                    f"{self.max_frame_size} bytes"
                )
            if len(self._buffer) < _HEADER.size + length:
                return
            payload = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
            del self._buffer[: _HEADER.size + length]
            yield _decode_payload(kind, payload)


def _decode_payload(kind: Kind, payload: bytes) -> Message:
    if len(payload) < _JSON_LENGTH.size:
        raise ProtocolError(f"{kind.name} frame is too short to hold its body")
    (text_length,) = _JSON_LENGTH.unpack_from(payload)
    end = _JSON_LENGTH.size + text_length
    if end > len(payload):
        raise ProtocolError(f"{kind.name} frame body overruns the frame")
    try:
        body = json.loads(payload[_JSON_LENGTH.size : end].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{kind.name} frame body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind.name} frame body is not a JSON object")
    blob = payload[end:]
    if blob and kind is not Kind.GRAPH:
        raise ProtocolError(f"{kind.name} frame carries {len(blob)} unexpected bytes")
    return Message(kind, body, blob)


# (state, direction seen from the originator, kind) -> next state
_IN, _OUT = "in", "out"
_TRANSITIONS: dict[tuple[str, str, Kind], str] = {
    ("start", _IN, Kind.HELLO): "hello-received",
    ("start", _OUT, Kind.ERROR): "closed",
    ("hello-received", _OUT, Kind.HELLO): "idle",
    ("hello-received", _OUT, Kind.ERROR): "closed",
    ("authenticating", _IN, Kind.AUTH): "auth-check",
    ("auth-check", _OUT, Kind.AUTHED): "idle",
    ("idle", _IN, Kind.LIST): "listing",
    ("listing", _OUT, Kind.SERVICES): "idle",
    ("idle", _IN, Kind.TAKE): "taking",
    ("idle", _IN, Kind.CHECK): "checking",
    ("checking", _OUT, Kind.CHECKED): "idle",
    ("checking", _OUT, Kind.ERROR): "idle",
    ("taking", _OUT, Kind.ERROR): "idle",
    ("taking", _OUT, Kind.FDS): "taking",
    ("taking", _IN, Kind.AHEAD_READY): "ahead-ready",
    ("ahead-ready", _OUT, Kind.ERROR): "idle",
    ("ahead-ready", _OUT, Kind.GRAPH): "sending-fds",
    ("sending-fds", _OUT, Kind.FDS): "sending-fds",
    ("await-committed", _IN, Kind.COMMITTED): "idle",
    ("await-committed", _IN, Kind.REFUSED): "idle",
    # A move across hosts in doubt (see the module's docstring).
    ("idle", _IN, Kind.OUTCOME): "outcome",
    ("outcome", _OUT, Kind.COMMIT): "idle",
    ("outcome", _OUT, Kind.ERROR): "idle",
}

# The same, for a move across hosts (from TAKE with "cross_host": true to its end).
_CROSS_TRANSITIONS: dict[tuple[str, str, Kind], str] = {
    ("taking", _OUT, Kind.ERROR): "idle",
    ("taking", _OUT, Kind.GRAPH): "await-ready",
    ("await-ready", _IN, Kind.READY): "ready",
    ("await-ready", _IN, Kind.REFUSED): "idle",
    ("ready", _OUT, Kind.COMMIT): "await-committed",
    ("ready", _OUT, Kind.ERROR): "idle",
    ("await-committed", _IN, Kind.COMMITTED): "idle",
}


@dataclass
class Move:
    """The descriptors of one move, as announced and as carried so far.

    Both sides keep the same account, each from its own
    :class:`Conversation`, so a peer that announces one thing and sends
    another is caught by the same rules on either side.

    Attributes:
        service: the service TAKE named.
        ahead: how many sockets the arbiter's frame said would follow it
            (None until the arbiter has come).
        ahead_sent: how many of those have come.
        twins: the kind of twin the batches sent ahead name (None: none).
        late: descriptors the GRAPH said would follow it, not come yet.
        cross_host: a move to another host (no descriptors; see _CROSS_TRANSITIONS).
    """

    service: str
    cross_host: bool = False
    ahead: int | None = None
    ahead_sent: int = 0
    twins: str | None = None
    late: int = 0

    @property
    def ahead_complete(self) -> bool:
        """The arbiter and every socket it announced have come."""
        return self.ahead is not None and self.ahead_sent == self.ahead


class Conversation:
    """One side's view of the conversation: checks the order of messages.

    ``send`` and ``receive`` both validate a message against the state
    machine above and advance it; a message out of turn raises
    ``ProtocolError`` naming the state and the message. While a service is
    in transit the conversation also keeps the move's account (:class:`Move`)
    and applies its rules (see ``_check_move``).

    Args:
        role: this side's role.
        limits: this side's limits; ``max_fds`` bounds what one move may bring.
    """

    def __init__(self, role: Role, limits: Limits = Limits()) -> None:
        self.role = role
        self.limits = limits
        self.state = "start"
        self.move: Move | None = None

    @property
    def fds_expected(self) -> int:
        """Descriptors the GRAPH announced that have not come yet."""
        return self.move.late if self.move is not None else 0

    def send(self, message: Message) -> bytes:
        """Advance on an outgoing message and return its frame."""
        self._advance(message, outgoing=True)
        return message.encode()

    def receive(self, message: Message) -> None:
        """Advance on an incoming message."""
        self._advance(message, outgoing=False)

    def fd_limit_refusal(self, count: int) -> str | None:
        """Why a move of ``count`` descriptors is over this side's limit (None: it is not)."""
        if count <= self.limits.max_fds:
            return None
        name = self.move.service if self.move is not None else "?"
        return f"service {name!r} holds {count} descriptors; the limit is {self.limits.max_fds}"

    def _advance(self, message: Message, *, outgoing: bool) -> None:
        if message.kind is Kind.BYE:
            self.state = "closed"
            self.move = None
            return
        from_originator = outgoing == (self.role is Role.ORIGINATOR)
        table = _TRANSITIONS
        if self.move is not None and self.move.cross_host:
            table = _CROSS_TRANSITIONS
        nxt = table.get((self.state, _OUT if from_originator else _IN, message.kind))
        if nxt is None and message.kind is Kind.ERROR and from_originator:
            # An originator may give up on any step; the channel then closes.
            nxt = "closed"
        if nxt is None:
            who = "originator" if from_originator else "recipient"
            raise ProtocolError(
                f"unexpected {message.kind.name} from the {who} in state {self.state!r}"
            )
        if message.kind is Kind.HELLO and from_originator and message.body.get("auth"):
            # A secret is configured: the recipient must prove it before anything else.
            nxt = "authenticating"
        if message.kind is Kind.TAKE:
            self.move = Move(_text(message.body, "service"), message.body.get("cross_host") is True)
        elif message.kind in (Kind.CHECK, Kind.OUTCOME):
            _text(message.body, "service")
            if message.kind is Kind.OUTCOME:
                _text(message.body, "move")
        elif self.move is not None:
            nxt = self._check_move(self.move, message, nxt)
        self.state = nxt
        if nxt in ("idle", "closed"):
            self.move = None

    def _check_move(self, move: Move, message: Message, nxt: str) -> str:
        """Apply the rules of a move in progress to ``message``; the state it leads to.

        Nothing is changed unless the message is accepted.
        """
        body = message.body
        if move.cross_host:
            if message.kind is Kind.GRAPH and (
                body.get("cross_host") is not True or body.get("fds") != 0
            ):
                raise ProtocolError(
                    f"the graph of {move.service!r} must move across hosts without "
                    f"descriptors, not {body.get('fds')!r}"
                )
            return nxt
        if message.kind is Kind.FDS and self.state == "taking":
            if move.ahead is None:
                self._check_arbiter(move, body)
            else:
                count = _count(body, "count")
                if count == 0:
                    raise ProtocolError("FDS frame sent ahead of the graph carries no descriptors")
                if move.ahead_sent + count > move.ahead:
                    raise ProtocolError(
                        f"{move.ahead_sent + count} sockets sent ahead of the graph of "
                        f"{move.service!r}, the arbiter announced {move.ahead}"
                    )
                twins = _twin_kind(body)
                if move.ahead_sent and twins != move.twins:
                    raise ProtocolError("the batches sent ahead disagree on their twins")
                check_kinds(body.get("kinds"), count)
                move.twins = twins
                move.ahead_sent += count
        elif message.kind is Kind.AHEAD_READY:
            if not move.ahead_complete or body.get("count") != move.ahead:
                raise ProtocolError(
                    f"the recipient said {body.get('count')!r} sockets sent ahead are ready; "
                    f"{move.ahead_sent} of {move.ahead!r} were sent"
                )
        elif message.kind is Kind.GRAPH:
            self._check_graph(move, body)
            return "sending-fds" if move.late else "await-committed"
        elif message.kind is Kind.FDS:
            count = _count(body, "count")
            if count == 0 or count > move.late:
                raise ProtocolError(
                    f"FDS frame carries {count} descriptors, {move.late} were announced"
                )
            move.late -= count
            return "sending-fds" if move.late else "await-committed"
        return nxt

    def _check_arbiter(self, move: Move, body: dict[str, Any]) -> None:
        """The first FDS frame of a move: the arbiter, which says how many sockets follow."""
        if body.get("arbiter") is not True or body.get("count") != 1:
            raise ProtocolError(
                f"the first descriptor of a move must be its arbiter, alone, not {body!r}"
            )
        ahead = _count(body, "ahead")
        refusal = self.fd_limit_refusal(1 + ahead)
        if refusal is not None:
            raise ProtocolError(refusal)
        move.ahead = ahead

    def _check_graph(self, move: Move, body: dict[str, Any]) -> None:
        late = _count(body, "fds")
        if body.get("ahead") != move.ahead:
            raise ProtocolError(
                f"the graph counts {body.get('ahead')!r} sockets sent ahead, "
                f"{move.ahead_sent} were sent"
            )
        if body.get("twins") is not (move.twins is not None):
            raise ProtocolError(
                f"the graph says twins: {body.get('twins')!r}, but the sockets sent ahead "
                f"{'had' if move.twins is not None else 'had none'}"
            )
        refusal = self.fd_limit_refusal(1 + move.ahead_sent + late)
        if refusal is not None:
            raise ProtocolError(refusal)
        move.late = late


def check_kinds(kinds: Any, count: int) -> list[list[int]]:
    """Validate the socket kinds of a batch sent ahead, for ``count`` descriptors.

    ``kinds`` is ``[[count, family, type, proto, twin], ...]`` in descriptor
    order; ``twin`` is 1 for a socket that has a twin.
    """
    if not isinstance(kinds, list) or not all(
        isinstance(k, list)
        and len(k) == 5
        and all(type(v) is int for v in k)
        and k[0] > 0
        and k[4] in (0, 1)
        for k in kinds
    ):
        raise ProtocolError(f"malformed socket kinds {kinds!r} for descriptors sent ahead")
    described = sum(k[0] for k in kinds)
    if described != count:
        raise ProtocolError(f"socket kinds describe {described} descriptors, {count} were sent")
    return kinds


def _twin_kind(body: dict[str, Any]) -> str | None:
    kind = body.get("twins")
    if kind is not None and not isinstance(kind, str):
        raise ProtocolError(f"'twins' must name a kind of twin, not {kind!r}")
    return kind


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key!r} must be a non-negative integer, not {value!r}")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key!r} must be a string, not {value!r}")
    return value


def hello(role: Role, *, pid: int, pickle_protocol: int, python: str, **extra: Any) -> Message:
    """The HELLO message a side sends about itself."""
    return Message(
        Kind.HELLO,
        {
            "protocol": PROTOCOL_VERSION,
            "role": role.value,
            "pid": pid,
            "pickle_protocol": pickle_protocol,
            "python": python,
            **extra,
        },
    )


def check_hello(message: Message, expected_role: Role) -> dict[str, Any]:
    """Validate a peer's HELLO and return its body."""
    body = message.body
    if message.kind is not Kind.HELLO:
        raise ProtocolError(f"expected HELLO, got {message.kind.name}")
    if body.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks control protocol {body.get('protocol')!r}, this side speaks "
            f"{PROTOCOL_VERSION}: upgrade the older takeover"
        )
    if body.get("role") != expected_role.value:
        raise ProtocolError(
            f"peer says its role is {body.get('role')!r}; expected {expected_role.value!r}"
        )
    _count(body, "pid")
    _count(body, "pickle_protocol")
    return body


def error(exc_code: str, message: str) -> Message:
    """An ERROR message."""
    return Message(Kind.ERROR, {"code": exc_code, "message": message})
