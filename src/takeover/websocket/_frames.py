"""A wsproto connection as plain data, and back: what a WebSocket's frame state moves as.

wsproto's :class:`~wsproto.connection.Connection` cannot be pickled as it is:
its :class:`~wsproto.frame_protocol.FrameProtocol` parses with a generator
(``_parse_more``), and a text message's UTF-8 decoder is an object of the
codecs machinery. Neither holds anything a move would lose, though:

* the generator's one local is ``closed``, set once a CLOSE frame was parsed,
  after which the generator ends; everything else it works on lives in the
  frame and message decoders. So it is rebuilt on the recipient with
  ``_parse_more_gen()``, and closed at once if it had ended;
* the decoder's state is ``getstate()``: the bytes of a character cut in two
  by a frame boundary.

:func:`freeze` turns the connection into builtins (bytes, ints, tuples), and
the permessage-deflate extension, if any, into a :class:`MovableDeflate`
that pickles itself; :func:`thaw` builds a working connection from them with
wsproto's own classes. A frame half received (its header, or part of its
payload, in the decoder's buffer), a fragmented message half received, a
close handshake begun on either side: all of it is in the decoders and moves.

wsproto 1.2 and 1.3 keep the same attributes (checked by :func:`freeze`,
which names what it does not know rather than guess).
"""

from __future__ import annotations

import codecs
import inspect
import pickle
from typing import Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.frame_protocol import (
    Header,
    MessageDecoder,
    Opcode,
    RsvBits,
    XorMaskerNull,
    XorMaskerSimple,
)

from ._deflate import MovableDeflate

# What takeover knows of wsproto's objects (1.2.0 to 1.3.2).
_CONNECTION = {"client", "_events", "_proto", "_state"}
_PROTOCOL = {
    "client",
    "extensions",
    "_frame_decoder",
    "_message_decoder",
    "_parse_more",
    "_outbound_opcode",
}
_FRAMES = {
    "client",
    "extensions",
    "buffer",
    "header",
    "effective_opcode",
    "masker",
    "payload_required",
    "payload_consumed",
}
_MESSAGES = {"opcode", "decoder"}


def _check(obj: object, known: set[str]) -> None:
    names = set(vars(obj))
    if names != known:
        raise pickle.PicklingError(
            f"this wsproto's {type(obj).__name__} holds {sorted(names ^ known)}, which "
            "takeover.websocket does not know how to move (it knows wsproto 1.2 and 1.3); "
            "install the wsproto that takeover's ws extra pins"
        )


def _opcode(value: Opcode | None) -> int | None:
    return None if value is None else int(value)


def _unopcode(value: int | None) -> Opcode | None:
    return None if value is None else Opcode(value)


def freeze(conn: Connection) -> dict[str, Any]:
    """``conn``'s state as builtins and :class:`MovableDeflate` objects.

    Raises:
        pickle.PicklingError: the state cannot move (events not taken yet,
            a wsproto whose objects differ, a compressed message half sent).
    """
    proto = conn._proto
    frames = proto._frame_decoder
    messages = proto._message_decoder
    for obj, known in (
        (conn, _CONNECTION),
        (proto, _PROTOCOL),
        (frames, _FRAMES),
        (messages, _MESSAGES),
    ):
        _check(obj, known)
    if conn._events:
        raise pickle.PicklingError(
            f"{len(conn._events)} WebSocket event(s) were received and not yet taken "
            "with events(): take them before the connection can move"
        )
    for ext in proto.extensions:
        if not isinstance(ext, MovableDeflate):
            raise pickle.PicklingError(
                f"the WebSocket extension {ext!r} cannot move: only takeover.websocket's "
                "MovableDeflate (permessage-deflate) carries its state"
            )
    header = frames.header
    masker = frames.masker
    if isinstance(masker, XorMaskerSimple):
        mask: Any = bytes(masker._masking_key)
    elif isinstance(masker, XorMaskerNull):
        mask = "null"
    else:
        mask = None
    decoder = messages.decoder
    return {
        "client": conn.client,
        "state": conn._state.name,
        "extensions": list(proto.extensions),
        "finished": _finished(proto._parse_more),
        "outbound_opcode": _opcode(proto._outbound_opcode),
        "buffer": bytes(frames.buffer.buffer[frames.buffer.bytes_used :]),
        "header": None
        if header is None
        else (
            header.fin,
            tuple(header.rsv),
            int(header.opcode),
            header.payload_len,
            None if header.masking_key is None else bytes(header.masking_key),
        ),
        "effective_opcode": _opcode(frames.effective_opcode),
        "mask": mask,
        "payload_required": frames.payload_required,
        "payload_consumed": frames.payload_consumed,
        "message_opcode": _opcode(messages.opcode),
        "utf8": None if decoder is None else decoder.getstate(),
    }


def _finished(parser: Any) -> bool:
    """Whether the parser generator ended (a CLOSE frame, or a parse error)."""
    state = inspect.getgeneratorstate(parser)
    if state == inspect.GEN_CLOSED:
        return True
    if state == inspect.GEN_SUSPENDED:
        # Suspended right after yielding the CLOSE frame: ends at the next step.
        return bool(parser.gi_frame.f_locals.get("closed"))
    return False


def thaw(state: dict[str, Any]) -> Connection:
    """A wsproto connection that goes on where the frozen one stopped."""
    kind = ConnectionType.CLIENT if state["client"] else ConnectionType.SERVER
    extensions = list(state["extensions"])
    for ext in extensions:
        if not isinstance(ext, MovableDeflate):
            raise pickle.UnpicklingError(f"not a WebSocket extension takeover moves: {ext!r}")
    conn = Connection(kind, extensions=extensions)
    conn._state = ConnectionState[state["state"]]
    proto = conn._proto
    proto._outbound_opcode = _unopcode(state["outbound_opcode"])
    if state["finished"]:
        proto._parse_more.close()
    frames = proto._frame_decoder
    frames.buffer.feed(state["buffer"])
    header = state["header"]
    if header is not None:
        fin, rsv, opcode, length, key = header
        frames.header = Header(fin, RsvBits(*rsv), Opcode(opcode), length, key)
    frames.effective_opcode = _unopcode(state["effective_opcode"])
    mask = state["mask"]
    if mask == "null":
        frames.masker = XorMaskerNull()
    elif mask is not None:
        frames.masker = XorMaskerSimple(bytes(mask))
    frames.payload_required = state["payload_required"]
    frames.payload_consumed = state["payload_consumed"]
    messages = proto._message_decoder
    messages.opcode = _unopcode(state["message_opcode"])
    if state["utf8"] is not None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        decoder.setstate(state["utf8"])
        messages.decoder = decoder
    return conn


__all__ = ["MessageDecoder", "freeze", "thaw"]
