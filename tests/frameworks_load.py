"""Clients of the framework examples, for tests/test_frameworks.py.

Each client kind runs in threads of its own until stopped and counts, in a
:class:`Tally`, what it saw: answers, connections opened, connections
refused, connections reset (ECONNRESET, EPIPE, a WebSocket closed without a
close frame), polite closes (a response saying ``Connection: close``, a
WebSocket closed with 1012, a FIN after a complete echoed line), clean closes
between two requests (an EOF where the next response would start, on a
connection that had answered before), and any other failure with what it was.

The probes (:class:`Probe`) are one-off clients started before an upgrade
and checked after it: a request in flight, an idle keep-alive connection, a
connection still at work at the drain deadline.
"""

from __future__ import annotations

import errno
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.waiting import wait_until

TIMEOUT = 15.0
PID = re.compile(r"pid (\d+)")


class Closed(Exception):
    """The server closed before answering (``partial``: in the middle of the answer)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("truncated answer" if partial else "closed before answering")
        self.partial = partial


@dataclass
class Tally:
    """What the clients of one kind saw."""

    ok: int = 0
    connections: int = 0
    refused: int = 0
    reset: int = 0
    polite: int = 0
    clean: int = 0
    failures: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def answered(self, text: str | None = None) -> None:
        with self.lock:
            self.ok += 1
            found = PID.search(text or "")
            if found:
                self.pids.add(int(found[1]))

    def error(self, exc: BaseException, what: str) -> None:
        """Count ``exc``: refused, reset, or a failure described with ``what``."""
        kind = classify(exc)
        with self.lock:
            if kind == "refused":
                self.refused += 1
            elif kind == "reset":
                self.reset += 1
            else:
                self.failures.append(f"{what}: {exc!r}")

    def summary(self) -> dict[str, int]:
        with self.lock:
            return {
                "ok": self.ok,
                "connections": self.connections,
                "refused": self.refused,
                "reset": self.reset,
                "polite closes": self.polite,
                "clean closes": self.clean,
                "failures": len(self.failures),
            }


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "failure"


class Load:
    """Client loops in threads: ``workers`` maps a name to (function, threads)."""

    def __init__(self, port: int, workers: dict[str, tuple[Callable[..., None], int]]) -> None:
        self.stopping = threading.Event()
        self.tallies = {name: Tally() for name in workers}
        self.threads = [
            threading.Thread(
                target=self._run, args=(function, port, self.tallies[name]), daemon=True
            )
            for name, (function, count) in workers.items()
            for _ in range(count)
        ]

    def _run(self, function: Callable[..., None], port: int, tally: Tally) -> None:
        try:
            function(port, tally, self.stopping)
        except BaseException as exc:  # a bug in the client: fail the test with it
            tally.failures.append(f"client crashed: {exc!r}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)

    def answers(self) -> int:
        return sum(t.ok for t in self.tallies.values())

    def wait_served_by(self, pid: int) -> None:
        """Until every client kind has answers from ``pid`` and some more besides."""
        before = self.answers()
        wait_until(
            lambda: (
                all(pid in t.pids or not t.pids for t in self.tallies.values())
                and self.answers() >= before + 20
            ),
            what=f"answers from pid {pid}",
        )

    def summary(self) -> dict[str, dict[str, int]]:
        return {name: tally.summary() for name, tally in self.tallies.items()}

    def problems(self) -> dict[str, Any]:
        """Every refused or reset connection and every failure, by client kind."""
        found: dict[str, Any] = {}
        for name, tally in self.tallies.items():
            if tally.refused or tally.reset or tally.failures:
                found[name] = {
                    "refused": tally.refused,
                    "reset": tally.reset,
                    "failures": tally.failures[:10],
                }
        return found


def connect(port: int, tally: Tally | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if tally is not None:
        tally.add(connections=1)
    return sock


# -- HTTP/1.1, over raw sockets ------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


def http_get(sock: socket.socket, reader: Any, path: str, keep_alive: bool = True) -> Response:
    """Send GET ``path`` and read the whole response (Content-Length, or up to EOF).

    Raises:
        Closed: EOF before the first byte of the response, or in its middle.
    """
    connection = "keep-alive" if keep_alive else "close"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: {connection}\r\n\r\n".encode())
    line = reader.readline()
    if not line:
        raise Closed(partial=False)
    if not line.endswith(b"\r\n"):
        raise Closed(partial=True)
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline()
        if not line.endswith(b"\r\n"):
            raise Closed(partial=True)
        if line == b"\r\n":
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        size = int(headers["content-length"])
        body = reader.read(size)
        if len(body) < size:
            raise Closed(partial=True)
    else:
        body = reader.read()
    return Response(status, headers, body.decode())


def _eof(reader: Any) -> bool:
    """Whether the server closes now (it said it would): EOF, and no RST."""
    return reader.read(1) == b""


def http_new_connections(port: int, tally: Tally, stopping: threading.Event) -> None:
    """A new connection per request (``Connection: close``), as fast as it goes."""
    while not stopping.is_set():
        try:
            with connect(port, tally) as sock, sock.makefile("rb") as reader:
                response = http_get(sock, reader, "/", keep_alive=False)
        except (OSError, Closed) as exc:
            tally.error(exc, "new connection")
            continue
        if response.status != 200:
            tally.failures.append(f"status {response.status}: {response.body!r}")
        else:
            tally.answered(response.body)


def http_keep_alive(port: int, tally: Tally, stopping: threading.Event) -> None:
    """Requests one after the other on a keep-alive connection, a new one when it closes."""
    while not stopping.is_set():
        try:
            sock = connect(port, tally)
        except OSError as exc:
            tally.error(exc, "connect")
            continue
        answered = 0
        with sock, sock.makefile("rb") as reader:
            while not stopping.is_set():
                try:
                    response = http_get(sock, reader, "/")
                except Closed as exc:
                    if answered and not exc.partial:
                        tally.add(clean=1)  # closed between two requests
                    else:
                        tally.failures.append(f"keep-alive after {answered} answers: {exc}")
                    break
                except OSError as exc:
                    tally.error(exc, f"keep-alive after {answered} answers")
                    break
                if response.status != 200:
                    tally.failures.append(f"status {response.status}: {response.body!r}")
                    break
                tally.answered(response.body)
                answered += 1
                if response.closes:
                    try:
                        closed = _eof(reader)
                    except OSError as exc:
                        tally.error(exc, "after Connection: close")
                        break
                    if closed:
                        tally.add(polite=1)
                    else:
                        tally.failures.append("Connection: close, then more bytes")
                    break


# -- WebSockets (the websockets library's own client) --------------------------------


def ws_connect(port: int) -> Any:
    """A WebSocket client connection (a context manager), the websockets library's own.

    No keepalive pings: their thread trips over PyPy 3.9's threading
    (``Thread.join`` with a timeout from another thread), and the tests run
    for seconds only.
    """
    from websockets.sync.client import connect as ws_client

    return ws_client(
        f"ws://127.0.0.1:{port}/", open_timeout=TIMEOUT, close_timeout=5, ping_interval=None
    )


def ws_error(tally: Tally, exc: BaseException, what: str) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, ConnectionClosed):
        if exc.rcvd is None:  # no close frame: the TCP connection was cut
            tally.add(reset=1)
        else:
            tally.failures.append(f"{what}: closed with {exc.rcvd.code} before its answer")
    elif isinstance(exc, InvalidStatus):
        tally.failures.append(f"{what}: handshake refused: {exc}")
    else:
        tally.error(exc, what)


def ws_new_connections(port: int, tally: Tally, stopping: threading.Event) -> None:
    """A new WebSocket connection per message."""
    for n in itertools.count():
        if stopping.is_set():
            return
        message = f"hello {n}"
        try:
            with ws_connect(port) as ws:
                tally.add(connections=1)
                ws.send(message)
                reply = ws.recv(timeout=TIMEOUT)
        except Exception as exc:
            ws_error(tally, exc, "new connection")
            continue
        if reply != message:
            tally.failures.append(f"sent {message!r}, got {reply!r}")
        else:
            tally.answered()


def ws_long_lived(port: int, tally: Tally, stopping: threading.Event) -> None:
    """One long-lived WebSocket connection at a time; 1012 makes it reconnect and resend."""
    from websockets.exceptions import ConnectionClosed

    counter = itertools.count()
    message = f"hello {next(counter)}"
    while not stopping.is_set():
        try:
            with ws_connect(port) as ws:
                tally.add(connections=1)
                while not stopping.is_set():
                    ws.send(message)
                    reply = ws.recv(timeout=TIMEOUT)
                    if reply != message:
                        tally.failures.append(f"sent {message!r}, got {reply!r}")
                    tally.answered()
                    message = f"hello {next(counter)}"
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1012:
                tally.add(polite=1)  # the message is sent again on the next connection
            else:
                ws_error(tally, exc, "long-lived")
        except Exception as exc:
            ws_error(tally, exc, "long-lived")


# -- the line echo (asyncio streams) -----------------------------------------------


def read_line(reader: Any) -> bytes:
    line: bytes = reader.readline()
    if not line:
        raise Closed(partial=False)
    if not line.endswith(b"\n"):
        raise Closed(partial=True)
    return line


def echo_new_connections(port: int, tally: Tally, stopping: threading.Event) -> None:
    """A new connection per line."""
    for n in itertools.count():
        if stopping.is_set():
            return
        line = f"hello {n}\n".encode()
        try:
            with connect(port, tally) as sock, sock.makefile("rb") as reader:
                sock.sendall(line)
                echoed = read_line(reader)
        except (OSError, Closed) as exc:
            tally.error(exc, "new connection")
            continue
        if echoed != line:
            tally.failures.append(f"sent {line!r}, got {echoed!r}")
        else:
            tally.answered()


def echo_long_lived(port: int, tally: Tally, stopping: threading.Event) -> None:
    """Lines one after the other on one connection; after a clean EOF, a new one."""
    counter = itertools.count()
    line = f"hello {next(counter)}\n".encode()
    while not stopping.is_set():
        try:
            sock = connect(port, tally)
        except OSError as exc:
            tally.error(exc, "connect")
            continue
        with sock, sock.makefile("rb") as reader:
            while not stopping.is_set():
                try:
                    sock.sendall(line)
                    echoed = read_line(reader)
                except Closed as exc:
                    if exc.partial:
                        tally.failures.append("truncated echo")
                    else:
                        tally.add(polite=1)  # FIN after a complete echo: the line goes again
                    break
                except OSError as exc:
                    tally.error(exc, "long-lived")
                    break
                if echoed != line:
                    tally.failures.append(f"sent {line!r}, got {echoed!r}")
                    break
                tally.answered()
                line = f"hello {next(counter)}\n".encode()


# -- probes ------------------------------------------------------------------------


class Probe(threading.Thread):
    """A one-off client in a thread: ``ready`` once in place, ``result`` when done."""

    def __init__(self, body: Callable[[Probe], Any]) -> None:
        super().__init__(daemon=True)
        self.body = body
        self.ready = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.body(self)
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.ready.set()

    def outcome(self) -> Any:
        self.join(TIMEOUT + 10)
        assert not self.is_alive(), "the probe is still waiting"
        if self.error is not None:
            raise AssertionError(f"probe failed: {self.error!r}") from self.error
        return self.result
