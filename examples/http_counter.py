"""An HTTP/1.1 keep-alive hit counter that moves to another process with its connections.

    python examples/http_counter.py --port 8080 --control /tmp/http.sock
    curl http://127.0.0.1:8080/          # hits: 1
    takeover take /tmp/http.sock         # another process takes it; the count goes on

Every GET answers with the number of GETs served so far, counted by one
:class:`Counter` that the factory and every connection share, so the count
travels with the service. Requests are parsed incrementally (request line,
headers, a ``Content-Length`` body), so a request cut in half by a move is
finished by the process that took it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from http import HTTPStatus

import takeover.asyncio as takeover

MAX_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024


class Counter:
    """The hit counter shared by the factory and every connection."""

    def __init__(self) -> None:
        self.hits = 0

    def hit(self) -> int:
        self.hits += 1
        return self.hits


class BadRequest(Exception):
    """A request this server cannot parse; answered with ``status`` and a close."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HttpCounter(asyncio.Protocol):
    """One keep-alive connection: parses requests as bytes arrive and answers each in turn."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = "request-line"
        self.method = ""
        self.target = ""
        self.version = ""
        self.headers: dict[str, str] = {}
        self.body_left = 0

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        try:
            self._parse()
        except BadRequest as exc:
            self._respond(exc.status, f"{exc}\n".encode(), keep_alive=False)

    def eof_received(self) -> bool | None:
        # A half-closed client gets no more answers; a partial request is dropped.
        return None

    # -- parsing --------------------------------------------------------------------

    def _line(self) -> str | None:
        end = self.buffer.find(b"\n")
        if end < 0:
            if len(self.buffer) > MAX_LINE:
                raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "line too long")
            return None
        if end > MAX_LINE:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "line too long")
        line = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[: end + 1]
        return line.decode("latin-1")

    def _parse(self) -> None:
        while not self.closed:
            if self.state == "request-line":
                line = self._line()
                if line is None:
                    return
                if not line:
                    continue  # RFC 9112 2.2: ignore empty lines before a request
                parts = line.split()
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad request line {line!r}")
                self.method, self.target, self.version = parts
                self.state = "headers"
            elif self.state == "headers":
                line = self._line()
                if line is None:
                    return
                if line:
                    self._header(line)
                    continue
                self._end_of_headers()
            else:  # "body"
                if len(self.buffer) < self.body_left:
                    return
                del self.buffer[: self.body_left]
                self.body_left = 0
                self._answer()

    def _header(self, line: str) -> None:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad header line {line!r}")
        if len(self.headers) >= MAX_HEADERS:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
        key = name.lower()
        value = value.strip()
        if key in self.headers:
            value = f"{self.headers[key]}, {value}"
        self.headers[key] = value

    def _end_of_headers(self) -> None:
        if "transfer-encoding" in self.headers:
            raise BadRequest(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported")
        length = self.headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        self.body_left = int(length)
        if self.body_left > MAX_BODY:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        self.state = "body"

    # -- answering --------------------------------------------------------------------

    def _keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if "close" in tokens:
            return False
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return True

    def _answer(self) -> None:
        keep_alive = self._keep_alive()
        if self.method in ("GET", "HEAD"):
            hits = self.counter.hit()
            body = f"hits: {hits}\npid: {os.getpid()}\npath: {self.target}\n".encode()
            self._respond(HTTPStatus.OK, body, keep_alive, head=self.method == "HEAD")
        else:
            body = f"{self.method} is not allowed here\n".encode()
            self._respond(
                HTTPStatus.METHOD_NOT_ALLOWED, body, keep_alive, extra="Allow: GET, HEAD\r\n"
            )
        self._reset()

    def _respond(
        self,
        status: HTTPStatus,
        body: bytes,
        keep_alive: bool,
        *,
        head: bool = False,
        extra: str = "",
    ) -> None:
        assert self.transport is not None
        head_lines = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            f"{extra}\r\n"
        )
        self.transport.write(head_lines.encode("latin-1") + (b"" if head else body))
        if not keep_alive:
            self.closed = True
            self.buffer.clear()
            self.transport.close()


class HttpCounterFactory:
    """The protocol factory: a picklable object that hands every connection the counter."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def __call__(self) -> HttpCounter:
        return HttpCounter(self.counter)


async def main(args: argparse.Namespace) -> None:
    factory = HttpCounterFactory(Counter())
    server = await takeover.start_server(factory, args.host, args.port, name="http")
    await takeover.serve_until_moved(
        server,
        **takeover.control_options(args),
        ready=lambda m: print(f"http on {args.host}:{args.port}, control {m.path}", flush=True),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    takeover.add_control_options(parser)
    asyncio.run(main(parser.parse_args()))
