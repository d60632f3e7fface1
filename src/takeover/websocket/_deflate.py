"""permessage-deflate (RFC 7692) whose compression state can move to another process.

zlib's compressor and decompressor objects cannot be pickled, and zlib does
not hand out their state. Between two messages, though, a deflate stream's
state is its window and nothing more: every message ends with a sync flush
(the ``00 00 ff ff`` that permessage-deflate strips), so no block is open on
either side. The window is the last 32 KiB of the uncompressed stream. So
:class:`MovableDeflate` keeps those bytes as it goes, for each direction, and
the recipient starts its zlib objects with them as the preset dictionary
(``zdict``), which for raw deflate is exactly a window: back-references from
the client's next compressed message resolve in it, and the recipient's
compressor may refer back into the bytes the client's decompressor holds.

A message half-received at the pause moves too: the compressed bytes of the
message so far are kept, and the recipient replays them through its new
decompressor (discarding the output, which was delivered already). A message
half-*sent* by the application (a fragmented send, whose compressor is
mid-block) cannot move: :meth:`WebSocketProtocol.send_text` always sends
whole messages, so only code that drives wsproto's fragments itself meets
this, and such a connection then stays behind to drain (``--drain``) or the
move fails naming it.

With ``client_no_context_takeover`` and ``server_no_context_takeover`` (the
client's offer, or the server's choice), no window is kept: each message is
compressed on its own and there is nothing to carry.
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any, Union

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

# The largest window RFC 7692 allows (max_window_bits 15). zlib keeps the last
# 2**bits bytes of a longer preset dictionary, so one size serves every offer.
WINDOW = 1 << 15

_Proto = Union[FrameDecoder, FrameProtocol]


def _slide(window: bytearray, data: Union[bytes, bytearray]) -> None:
    """Append ``data`` to ``window`` and keep its last :data:`WINDOW` bytes."""
    window += data
    if len(window) > WINDOW:
        del window[:-WINDOW]


class MovableDeflate(PerMessageDeflate):
    """wsproto's :class:`~wsproto.extensions.PerMessageDeflate` that keeps its windows.

    Memory: up to 32 KiB per direction per connection when context takeover
    is on (the client's default), which is also what a move then carries.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_window = bytearray()  # the window at the start of the inbound message
        self._in_message = bytearray()  # its compressed bytes so far
        self._in_output = bytearray()  # the last WINDOW bytes of its output so far
        self._out_window = bytearray()  # the last WINDOW bytes the client decompressed
        self._out_open = False  # a compressed message is half sent (fragments)
        self._restore_in = self._restore_out = False  # zlib objects a move left to make

    def _no_context(self, proto: _Proto, inbound: bool) -> bool:
        if proto.client == inbound:
            return self.server_no_context_takeover
        return self.client_no_context_takeover

    # -- inbound -------------------------------------------------------------------

    def frame_inbound_header(
        self, proto: _Proto, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> Union[CloseReason, RsvBits]:
        self._inflater()
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: _Proto, data: bytes) -> Union[bytes, CloseReason]:
        self._inflater()
        result = super().frame_inbound_payload_data(proto, data)
        if self._inbound_compressed and self._inbound_is_compressible:
            self._in_message += data
            if not isinstance(result, CloseReason):
                _slide(self._in_output, result)
        return result

    def frame_inbound_complete(self, proto: _Proto, fin: bool) -> Union[bytes, CloseReason, None]:
        self._inflater()
        compressed = bool(self._inbound_compressed and self._inbound_is_compressible)
        result = super().frame_inbound_complete(proto, fin)
        if compressed and fin:
            if isinstance(result, (bytes, bytearray)):
                _slide(self._in_output, result)
            if self._no_context(proto, inbound=True):
                self._in_window.clear()
            else:
                _slide(self._in_window, self._in_output)
            self._in_message.clear()
            self._in_output.clear()
        return result

    # -- outbound ------------------------------------------------------------------

    def frame_outbound(
        self, proto: _Proto, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        self._deflater()
        result = super().frame_outbound(proto, opcode, rsv, data, fin)
        if self._compressible_opcode(opcode):
            if self._no_context(proto, inbound=False):
                self._out_window.clear()
            else:
                _slide(self._out_window, data)
            self._out_open = not fin
        return result

    # -- moving ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self._out_open:
            raise pickle.PicklingError(
                "a permessage-deflate message is half sent on this WebSocket (the "
                "application sent fragments and not the last one): its compressor is in the "
                "middle of a block and cannot move; send whole messages, or let such "
                "connections drain (--drain)"
            )
        state = dict(vars(self))  # the windows pickle as they are (bytearray: no copy)
        state["_compressor"] = state["_decompressor"] = None
        state.pop("_restore_in", None)
        state.pop("_restore_out", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        # The zlib objects are made when the connection next needs them, not here:
        # a move of 1,000 connections would otherwise spend its pause making 2,000
        # of them and hashing 64 MB of windows into their dictionaries.
        self._restore_in = bool(self._in_window or self._in_message or self._inbound_compressed)
        self._restore_out = bool(self._out_window)

    def _inflater(self) -> None:
        """Make the decompressor a move left to make (see __setstate__)."""
        if not getattr(self, "_restore_in", False):
            return
        self._restore_in = False
        # takeover.websocket is the server: the client compresses with the client's bits.
        decompressor = _decompressor(self.client_max_window_bits, self._in_window)
        # A message half received: the same input rebuilds the same state (its
        # output, delivered already, is dropped 64 KiB at a time). A compressed
        # message whose header came, and none of its payload, needs the
        # decompressor too: the header made it, and will not again.
        pending = bytes(self._in_message)
        while True:
            out = decompressor.decompress(pending, 1 << 16)
            pending = decompressor.unconsumed_tail
            if not pending and len(out) < 1 << 16:
                break  # all input taken, and no output left inside
        self._decompressor = decompressor

    def _deflater(self) -> None:
        """Make the compressor a move left to make (see __setstate__)."""
        if not getattr(self, "_restore_out", False):
            return
        self._restore_out = False
        self._compressor = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION,
            zlib.DEFLATED,
            -self.server_max_window_bits,
            zdict=bytes(self._out_window),
        )


def _decompressor(bits: int, window: Union[bytes, bytearray]) -> Any:
    if window:
        return zlib.decompressobj(-bits, zdict=bytes(window))
    return zlib.decompressobj(-bits)
