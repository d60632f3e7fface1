"""A WebSocket echo on takeover.websocket, for the tests of moves mid-frame.

    python tests/apps/ws_app.py --port PORT --control PATH [--no-deflate]

GET / answers ``pid PID``. On /ws each text message is answered
``PID N TEXT`` (N counts this connection's messages), except the commands:
``big N`` answers one text message of N bytes (``x`` after the header line),
``close`` begins the close handshake from the server (code 4000),
``ping`` sends a ping whose payload is the pid, ``fragment`` sends the
first fragment of a message and never the rest. Binary messages come back as
they are.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from wsproto.events import TextMessage

import takeover.asyncio as takeover
from takeover.websocket import Request, Response, WebSocketProtocol


class Echo(WebSocketProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def http_request(self, request: Request) -> Response:
        if request.path == "/":
            return Response(200, f"pid {os.getpid()}\n".encode())
        return super().http_request(request)

    def text_received(self, text: str) -> None:
        self.count += 1
        if text.startswith("big "):
            size = int(text.split()[1])
            head = f"{os.getpid()} {self.count} big\n"
            self.send_text(head + "x" * (size - len(head)))
        elif text == "close":
            self.close_websocket(4000, f"closed by {os.getpid()}")
        elif text == "fragment":
            # The first fragment of a message, by wsproto directly: a compressed
            # message half sent cannot move (its compressor is mid-block).
            assert self._ws is not None
            self._write(
                self._ws.send(TextMessage(data=f"{os.getpid()} first", message_finished=False))
            )
        elif text == "ping":
            self.ping(str(os.getpid()).encode())
        else:
            self.send_text(f"{os.getpid()} {self.count} {text}")

    def bytes_received(self, data: bytes) -> None:
        self.send_bytes(data)


class Deflateless(Echo):
    deflate = False


async def main(args: argparse.Namespace) -> None:
    factory = Deflateless if args.no_deflate else Echo
    server = await takeover.start_server(factory, "127.0.0.1", args.port, name="ws")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"ws on {args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-deflate", action="store_true")
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
