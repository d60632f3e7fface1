"""WebSocket connections that move: an asyncio protocol on h11 and wsproto.

    from takeover.websocket import WebSocketProtocol, Response

    class Echo(WebSocketProtocol):
        def http_request(self, request):
            return Response(200, b"<p>hello</p>", "text/html")
        def text_received(self, text):
            self.send_text(text)

    server = await takeover.asyncio.start_server(Echo, host, port, name="echo")

Each connection moves with the service at any point of its life: in the
middle of an HTTP request, of a frame, of a fragmented message, of a close
handshake, with permessage-deflate or without. ``docs/websocket.md`` says
how. A recipient admits these classes without ``--trust`` or ``--allow``.

Needs the ``ws`` extra: ``pip install 'takeover[ws]'`` (h11 and wsproto).
"""

from __future__ import annotations

try:
    import h11  # noqa: F401
    import wsproto  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"takeover.websocket needs h11 and wsproto ({exc}): pip install 'takeover[ws]'"
    ) from exc

from ._deflate import MovableDeflate
from ._protocol import (
    ABNORMAL,
    GOING_AWAY,
    NORMAL,
    PROTOCOL_ERROR,
    TOO_BIG,
    Request,
    Response,
    WebSocketProtocol,
)

__all__ = [
    "ABNORMAL",
    "GOING_AWAY",
    "NORMAL",
    "PROTOCOL_ERROR",
    "TOO_BIG",
    "MovableDeflate",
    "Request",
    "Response",
    "WebSocketProtocol",
]
