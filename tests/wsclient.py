"""A blocking WebSocket client on wsproto for the tests: whole messages, or raw bytes cut anywhere.

The tests cut a request, a frame or a message in two around a move, so this
client hands out the bytes wsproto would send (:meth:`frame_bytes`) instead
of always sending them whole, and can write hand-made frames
(:func:`frame`) that wsproto would not (a UTF-8 character cut between two
fragments).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

TIMEOUT = 10.0
TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9
CONTINUATION = 0x0


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame, uncompressed (RSV bits clear)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


class WsClient:
    """One WebSocket connection to 127.0.0.1:``port``; ``deflate``: offer permessage-deflate."""

    def __init__(
        self,
        port: int,
        target: str = "/ws",
        deflate: bool = True,
        rcvbuf: int | None = None,
        handshake: bool = True,
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self.accepted: AcceptConnection | None = None
        self.eof = False
        self._parts: list[Any] = []
        if handshake:
            offer = [PerMessageDeflate()] if deflate else []
            self.sock.sendall(
                self.ws.send(Request(host=f"127.0.0.1:{port}", target=target, extensions=offer))
            )
            accepted = self.next_event()
            assert isinstance(accepted, AcceptConnection), accepted
            self.accepted = accepted

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def deflate(self) -> bool:
        """Whether the server accepted permessage-deflate."""
        return bool(self.accepted and self.accepted.extensions)

    # -- sending ---------------------------------------------------------------------

    def frame_bytes(self, event: Event) -> bytes:
        """What wsproto sends for ``event`` (compressed if negotiated), not sent yet."""
        return self.ws.send(event)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def say(self, text: str) -> None:
        self.send(self.frame_bytes(TextMessage(data=text)))

    # -- receiving -------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, reading as needed; fails on EOF first."""
        while not self.events:
            for event in self.ws.events():
                self.events.append(event)
            if self.events:
                break
            assert not self.eof, "the server closed the connection"
            data = self.sock.recv(1 << 20)
            if not data:
                self.eof = True
                self.ws.receive_data(None)
            else:
                self.ws.receive_data(data)
        return self.events.pop(0)

    def message(self) -> Any:
        """The next whole message (str or bytes), skipping nothing else: fails on another event."""
        while True:
            event = self.next_event()
            assert isinstance(event, Message), event
            self._parts.append(event.data)
            if event.message_finished:
                parts, self._parts = self._parts, []
                if isinstance(event, TextMessage):
                    return "".join(parts)
                assert isinstance(event, BytesMessage)
                return b"".join(parts)

    def pong(self) -> bytes:
        event = self.next_event()
        assert isinstance(event, Pong), event
        return bytes(event.payload)

    def closing(self) -> CloseConnection:
        event = self.next_event()
        assert isinstance(event, CloseConnection), event
        return event

    def at_eof(self) -> bool:
        """Whether the server closed TCP (after what was read)."""
        if self.eof:
            return True
        data = self.sock.recv(1 << 16)
        assert data == b"", f"more data where EOF was expected: {data[:80]!r}"
        self.eof = True
        return True
