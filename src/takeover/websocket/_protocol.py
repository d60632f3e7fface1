"""An asyncio protocol that serves HTTP/1.1 and WebSockets, and moves at any point."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, generate_accept_token

from . import _frames
from ._deflate import MovableDeflate

Headers = list[tuple[str, str]]


@dataclass
class Request:
    """An HTTP request's head, as the application's hooks see it.

    Attributes:
        method: ``GET`` or ``HEAD`` (others are answered 405 before any hook).
        target: the request target, ``/ws?room=1``.
        headers: the header fields, names in lower case, in order.
    """

    method: str
    target: str
    headers: Headers = field(default_factory=list)

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first field called ``name`` (any case), or ``default``."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default


@dataclass
class Response:
    """An HTTP response to a request that is not a WebSocket upgrade."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Headers = field(default_factory=list)


# Close codes (RFC 6455, 7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
TOO_BIG = 1009
ABNORMAL = 1006  # never sent: the code reported when the TCP connection ended without CLOSE


class WebSocketProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests, then, once upgraded, a WebSocket.

    Subclass it and override the hooks (:meth:`http_request`,
    :meth:`websocket_open`, :meth:`text_received`, :meth:`bytes_received`,
    :meth:`websocket_closed`); serve it with ``takeover.asyncio.start_server``
    like any protocol. HTTP is parsed by h11 and frames by wsproto.

    Every connection can move, whatever it is doing between two callbacks:

    * in HTTP, the bytes of a request not yet complete move and are parsed
      again by the recipient's h11 (which holds nothing else between requests);
    * as a WebSocket, wsproto's state moves as plain data (see ``_frames``):
      a frame or a fragmented message half received, a close handshake under
      way; bytes half sent are in the transport's buffer, which moves;
    * with permessage-deflate, the compression windows move
      (:class:`~takeover.websocket.MovableDeflate`).

    Pings are answered with pongs; a CLOSE from the client is answered and the
    connection closed. Attributes a subclass adds move with it, as with any
    protocol: keep them picklable.

    Class attributes:
        websocket_paths: the paths upgraded to WebSockets (others get 404
            when they ask to).
        max_message: the longest message accepted, in bytes (or characters);
            a longer one closes the WebSocket with 1009.
        deflate: whether permessage-deflate offers are accepted.
    """

    websocket_paths: Collection[str] = ("/ws",)
    max_message: int = 1 << 20
    deflate: bool = True

    transport: Optional[asyncio.Transport] = None
    request: Optional[Request] = None  # the request that opened the WebSocket

    # -- hooks ------------------------------------------------------------------------

    def http_request(self, request: Request) -> Response:
        """The response to a GET or HEAD that is not an upgrade (default: 404)."""
        return Response(404, b"not found\n")

    def websocket_accept(self, request: Request) -> bool:
        """Whether to upgrade ``request`` (default: its path is in ``websocket_paths``)."""
        return request.path in self.websocket_paths

    def websocket_open(self) -> None:
        """The WebSocket is open: the 101 response was written."""

    def text_received(self, text: str) -> None:
        """A whole text message arrived (fragments are joined first)."""

    def bytes_received(self, data: bytes) -> None:
        """A whole binary message arrived."""

    def pong_received(self, payload: bytes) -> None:
        """A pong arrived (the answer to :meth:`ping`)."""

    def websocket_closed(self, code: int, reason: str) -> None:
        """The WebSocket ended: by a close handshake (its code), or 1006 if the TCP
        connection ended without one. Called once."""

    # -- actions ----------------------------------------------------------------------

    @property
    def websocket(self) -> bool:
        """Whether the connection was upgraded (and the WebSocket is not over)."""
        return self._ws is not None and self._ws.state is not ConnectionState.CLOSED

    @property
    def open(self) -> bool:
        """Whether messages may be sent: upgraded, and no CLOSE sent or received."""
        return self._ws is not None and self._ws.state is ConnectionState.OPEN

    def send_text(self, text: str) -> bool:
        """Send ``text`` as one text message; False (and nothing sent) if not :attr:`open`."""
        return self._send(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> bool:
        """Send ``data`` as one binary message; False if not :attr:`open`."""
        return self._send(BytesMessage(data=bytes(data)))

    def ping(self, payload: bytes = b"") -> bool:
        """Send a ping (:meth:`pong_received` gets the answer); False if not :attr:`open`."""
        return self._send(Ping(payload=payload))

    def close_websocket(self, code: int = NORMAL, reason: str = "") -> None:
        """Begin the close handshake; the connection closes when the client answers."""
        if self._ws is not None and self._ws.state in (
            ConnectionState.OPEN,
            ConnectionState.REMOTE_CLOSING,
        ):
            ws = self._ws
            self._write(ws.send(CloseConnection(code=code, reason=reason)))
            after: ConnectionState = ws.state  # CLOSED if the client had closed first
            if after is ConnectionState.CLOSED:
                self._closed(code, reason)
                if self.transport is not None:
                    self.transport.close()
        elif self._ws is None and self.transport is not None:
            self.transport.close()

    # -- partial moves --------------------------------------------------------------------

    #: Seconds a WebSocket left behind by a partial move waits for the client's
    #: answer to the CLOSE sent at the drain deadline, before TCP is closed anyway.
    drain_close_wait: float = 2.0

    def takeover_drain_close(self) -> None:
        """At a partial move's drain deadline (a connection that could not move,
        see docs/websocket.md): close the WebSocket with 1001, going away, which
        tells the client to reconnect (to the new process); HTTP: close."""
        if self.open:
            self.close_websocket(GOING_AWAY, "the server moved; reconnect")
            asyncio.get_running_loop().call_later(self.drain_close_wait, self._close_transport)
        else:
            self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def __init__(self) -> None:
        self._http: Optional[h11.Connection] = h11.Connection(h11.SERVER)
        self._ws: Optional[Connection] = None
        self._parts: list[Union[str, bytes]] = []  # a fragmented message so far
        self._size = 0
        self._ended = False  # websocket_closed was called

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._ws is not None:
            self._ws_received(data)
        elif self._http is not None:
            self._http.receive_data(data)
            self._http_events()

    def eof_received(self) -> Optional[bool]:
        if self._ws is None and self._http is not None:
            self._http.receive_data(b"")
            self._http_events()
        return False  # close the transport

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._ws is not None:
            self._closed(ABNORMAL, "")
        self._http = None

    # -- HTTP ---------------------------------------------------------------------------

    def _http_events(self) -> None:
        http = self._http
        while http is not None and self._ws is None:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, f"bad request: {exc}\n")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                if self.transport is not None:
                    self.transport.close()
                return
            if isinstance(event, h11.Request):
                self._request(http, event)
                http = self._http
            # Data and EndOfMessage of a GET: nothing to do (bodies are refused).

    def _request(self, http: h11.Connection, event: h11.Request) -> None:
        request = Request(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
        )
        if request.method not in ("GET", "HEAD"):
            self._refuse(405, f"{request.method} is not served here\n", [("allow", "GET, HEAD")])
            return
        if request.header("content-length", "0") != "0" or request.header("transfer-encoding"):
            self._refuse(400, "a GET has no body here\n")
            return
        if (request.header("upgrade") or "").lower() == "websocket":
            self._upgrade(http, request)
            return
        try:
            response = self.http_request(request)
        except Exception:
            self._refuse(500, "internal error\n")
            raise
        self._respond(http, request, response)

    def _respond(self, http: h11.Connection, request: Request, response: Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        self._write(http.send(h11.Response(status_code=response.status, headers=headers)))
        if request.method != "HEAD" and response.body:
            self._write(http.send(h11.Data(data=response.body)))
        self._write(http.send(h11.EndOfMessage()))
        self._next_cycle(http)

    def _next_cycle(self, http: h11.Connection) -> None:
        """After a response: the next request on this connection, or close it."""
        _request_end(http)
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            self._http = None
            if self.transport is not None:
                self.transport.close()

    def _refuse(self, status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        http = self._http
        self._http = None
        if http is not None and http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = text.encode()
            head = [
                ("content-type", "text/plain; charset=utf-8"),
                ("content-length", str(len(body))),
                ("connection", "close"),
                *headers,
            ]
            try:
                self._write(http.send(h11.Response(status_code=status, headers=head)))
                self._write(http.send(h11.Data(data=body)))
                self._write(http.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        if self.transport is not None:
            self.transport.close()

    # -- the upgrade --------------------------------------------------------------------

    def _upgrade(self, http: h11.Connection, request: Request) -> None:
        connection = {token.lower() for token in _tokens(request, "connection")}
        key = request.header("sec-websocket-key")
        if "upgrade" not in connection or not key:
            self._refuse(400, "a WebSocket upgrade needs Connection: Upgrade and a key\n")
            return
        if request.header("sec-websocket-version") != "13":
            self._refuse(426, "WebSocket version 13 only\n", [("sec-websocket-version", "13")])
            return
        if not self.websocket_accept(request):
            self._refuse(404, "no WebSocket here\n")
            return
        headers = [
            ("upgrade", "WebSocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", generate_accept_token(key.encode()).decode()),
        ]
        extensions: list[MovableDeflate] = []
        if self.deflate:
            offered = _tokens(request, "sec-websocket-extensions")
            for offer in offered:
                if offer.split(";", 1)[0].strip() != MovableDeflate.name:
                    continue
                deflate = MovableDeflate()
                accepted = deflate.accept(offer)
                if accepted is None or accepted is False:
                    continue
                value = MovableDeflate.name
                if isinstance(accepted, str) and accepted:
                    value += "; " + accepted
                headers.append(("sec-websocket-extensions", value))
                extensions.append(deflate)
                break
        _request_end(http)
        self._write(http.send(h11.InformationalResponse(status_code=101, headers=headers)))
        trailing, _closed = http.trailing_data
        self._http = None
        self.request = request
        self._ws = Connection(ConnectionType.SERVER, extensions=list(extensions))
        self.websocket_open()
        if trailing:
            self._ws_received(bytes(trailing))

    # -- frames -------------------------------------------------------------------------

    def _ws_received(self, data: bytes) -> None:
        ws = self._ws
        assert ws is not None
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return  # the WebSocket is over: what follows CLOSE is ignored
        self._ws_events(ws.events())

    def _ws_events(self, events: Iterable[Event]) -> None:
        ws = self._ws
        assert ws is not None
        for event in events:
            if isinstance(event, Message):
                self._message(event)
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    self._write(ws.send(event.response()))
            elif isinstance(event, Pong):
                self.pong_received(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self._write(ws.send(event.response()))
                self._closed(event.code, event.reason or "")
                if self.transport is not None:
                    self.transport.close()

    def _message(self, event: Message[Any]) -> None:
        self._parts.append(event.data)
        self._size += len(event.data)
        if self._size > self.max_message:
            self._parts.clear()
            self._size = 0
            self.close_websocket(TOO_BIG, f"messages are limited to {self.max_message}")
            return
        if not event.message_finished:
            return
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, TextMessage):
            self.text_received("".join(parts))  # type: ignore[arg-type]
        else:
            self.bytes_received(b"".join(parts))  # type: ignore[arg-type]

    def _send(self, event: Event) -> bool:
        if self._ws is None or self._ws.state is not ConnectionState.OPEN:
            return False
        self._write(self._ws.send(event))
        return True

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _closed(self, code: int, reason: str) -> None:
        if not self._ended:
            self._ended = True
            self.websocket_closed(int(code), reason)

    # -- moving -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        http = state.pop("_http", None)
        ws = state.pop("_ws", None)
        if ws is not None:
            state["_ws_state"] = _frames.freeze(ws)
        elif http is not None:
            if http.our_state is not h11.IDLE or http.their_state is not h11.IDLE:
                # Not between requests: only while a response is refused and closing.
                state["_http_bytes"] = None
            else:
                state["_http_bytes"] = bytes(http.trailing_data[0])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        frozen = state.pop("_ws_state", None)
        pending = state.pop("_http_bytes", None)
        vars(self).update(state)
        self._ws = None if frozen is None else _frames.thaw(frozen)
        self._http = None
        if frozen is None and pending is not None:
            self._http = h11.Connection(h11.SERVER)
            if pending:
                self._http.receive_data(pending)


def _request_end(http: h11.Connection) -> None:
    """Take the EndOfMessage of a request without a body (h11 gives it after the Request)."""
    while http.their_state is h11.SEND_BODY:
        if http.next_event() is h11.NEED_DATA:
            break


def _tokens(request: Request, name: str) -> list[str]:
    """The comma-separated items of every ``name`` field of ``request``."""
    values = ",".join(value for key, value in request.headers if key == name)
    return [item.strip() for item in values.split(",") if item.strip()]
