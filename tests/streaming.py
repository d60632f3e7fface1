"""Checksummed two-way client streams against a line echo service.

Shared by the end-to-end tests that move a service while clients talk to it
(tests/test_stream.py, tests/test_faults.py). Each :class:`Stream` sends
random hex lines and checks every byte that comes back against what it sent,
as it arrives: a byte lost, duplicated or altered is caught at its offset,
even when the connection is later cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from harness.waiting import wait_until

WINDOW = 32 * 1024  # bytes a client may have sent and not yet seen come back


class Stream:
    """One client: sends random hex lines and reads the echo, both non-blocking."""

    def __init__(self, port: int, seed: int, window: int = WINDOW, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setblocking(False)
        self.random = random.Random(seed)
        self.window = window
        self.out = bytearray()
        self.inflight = bytearray()  # sent, not yet echoed: what must come back next
        self.sent_hash = hashlib.sha256()
        self.received_hash = hashlib.sha256()
        self.generated = 0  # bytes put in ``out`` (and in sent_hash) so far
        self.sent = 0
        self.received = 0
        self.mismatch: str | None = None  # the first byte that came back wrong
        self.shut = False
        self.eof = False
        self.error: BaseException | None = None

    def fill(self) -> None:
        """Queue a few more random lines."""
        lines = b"".join(
            os.urandom(self.random.randint(1, 120)).hex().encode() + b"\n"
            for _ in range(self.random.randint(1, 16))
        )
        self.out += lines
        self.sent_hash.update(lines)
        self.generated += len(lines)

    def events(self, stopping: bool) -> int:
        """What this client waits for next."""
        if self.error is not None or self.eof:
            return 0
        if stopping:
            writing = bool(self.out) or not self.shut
        else:
            writing = bool(self.out) or self.sent - self.received < self.window
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)

    def on_write(self, stopping: bool) -> None:
        if not self.out and not stopping:
            self.fill()
        if self.out:
            sent = self.sock.send(self.out)
            self.inflight += self.out[:sent]
            del self.out[:sent]
            self.sent += sent
        if stopping and not self.out and not self.shut:
            # Everything sent: the echo closes its side once it has echoed it all.
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = True

    def on_read(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            self.eof = True
            return
        if self.mismatch is None:
            expected = bytes(self.inflight[: len(data)])
            if len(data) > len(self.inflight):
                self.mismatch = f"{len(data) - len(self.inflight)} bytes more than were sent"
            elif data != expected:
                at = next(i for i, (a, b) in enumerate(zip(data, expected)) if a != b)
                self.mismatch = f"byte {self.received + at} differs from the one sent"
        del self.inflight[: len(data)]
        self.received += len(data)
        self.received_hash.update(data)

    @property
    def complete(self) -> bool:
        """Every byte sent came back, once and unaltered, and the echo closed."""
        return (
            self.error is None
            and self.mismatch is None
            and self.eof
            and self.shut
            and self.sent == self.generated == self.received
            and self.received_hash.digest() == self.sent_hash.digest()
        )


class Streams(threading.Thread):
    """Drives every :class:`Stream` from one selector until each has seen EOF."""

    def __init__(self, streams: list[Stream], deadline: float = 45.0) -> None:
        super().__init__(daemon=True)
        self.streams = streams
        self.deadline = deadline
        self.stopping = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failure = exc

    def _run(self) -> None:
        deadline = time.monotonic() + self.deadline
        with selectors.DefaultSelector() as selector:
            registered: dict[Stream, int] = {}
            while True:
                stopping = self.stopping.is_set()
                for stream in self.streams:
                    wanted = stream.events(stopping)
                    current = registered.get(stream, 0)
                    if wanted == current:
                        continue
                    if not wanted:
                        selector.unregister(stream.sock)
                        del registered[stream]
                    elif not current:
                        selector.register(stream.sock, wanted, stream)
                        registered[stream] = wanted
                    else:
                        selector.modify(stream.sock, wanted, stream)
                        registered[stream] = wanted
                if not registered:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"streams still running after {self.deadline} s")
                for key, mask in selector.select(0.1):
                    stream = key.data
                    try:
                        if mask & selectors.EVENT_READ:
                            stream.on_read()
                        if mask & selectors.EVENT_WRITE and not stream.eof:
                            stream.on_write(stopping)
                    except OSError as exc:
                        stream.error = exc


class TightLoop(threading.Thread):
    """Connects, echoes one line and closes, over and over, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            line = os.urandom(16).hex().encode() + b"\n"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(line)
                    echoed = b""
                    while len(echoed) < len(line):
                        data = sock.recv(len(line) - len(echoed))
                        if not data:
                            raise ConnectionError("EOF before the echo")
                        echoed += data
                if echoed != line:
                    self.errors.append(f"round {self.rounds}: sent {line!r}, got {echoed!r}")
                    return
            except OSError as exc:
                self.errors.append(f"round {self.rounds}: {type(exc).__name__}: {exc}")
                return
            self.rounds += 1


@dataclass
class Outcome:
    """What the clients saw, once every stream has ended.

    Attributes:
        clients: how many streams ran.
        errors: streams that failed (reset, EOF before their end, ...).
        corrupted: streams that got back a byte lost, duplicated or altered
            (checked at its offset, even on a stream that failed later).
        incomplete: streams without an error whose echo is not exactly what
            they sent.
        unechoed: bytes sent on failed streams that never came back (cut off
            with the connection).
    """

    clients: int
    errors: dict[int, str]
    corrupted: dict[int, str]
    incomplete: list[int]
    unechoed: int


class StreamingClients:
    """``count`` streams on ``port``, driven in the background; see :func:`streaming`."""

    def __init__(
        self, port: int, count: int, window: int, deadline: float, host: str = "127.0.0.1"
    ) -> None:
        self.streams: list[Stream] = []
        try:
            for i in range(count):
                self.streams.append(Stream(port, seed=i, window=window, host=host))
        except BaseException:
            self.close()
            raise
        self.driver = Streams(self.streams, deadline)
        self.driver.start()

    def received(self) -> int:
        """Bytes echoed so far, all streams together."""
        return sum(s.received for s in self.streams)

    def wait_all_echoing(self, timeout: float = 20.0) -> None:
        """Wait until every stream has had an echo."""
        wait_until(
            lambda: all(s.received for s in self.streams) or not self.driver.is_alive(),
            timeout,
            what="an echo on every stream",
        )
        assert self.driver.failure is None, self.driver.failure

    def wait_progress(self, timeout: float = 20.0) -> None:
        """Wait until every stream that is still open has had more bytes echoed."""
        marks = [s.received for s in self.streams]
        wait_until(
            lambda: (
                all(
                    s.received > mark or s.error is not None or s.eof
                    for s, mark in zip(self.streams, marks)
                )
                or not self.driver.is_alive()
            ),
            timeout,
            what="every open stream to advance",
        )

    def finish(self) -> Outcome:
        """Send what is queued, half-close, wait for each echo to end, and tally."""
        self.driver.stopping.set()
        self.driver.join(self.driver.deadline + 5)
        assert not self.driver.is_alive(), "the streams did not finish"
        assert self.driver.failure is None, self.driver.failure
        errors = {
            i: repr(s.error) if s.error is not None else "EOF before the end of the stream"
            for i, s in enumerate(self.streams)
            if s.error is not None or not s.shut
        }
        corrupted = {i: s.mismatch for i, s in enumerate(self.streams) if s.mismatch is not None}
        incomplete = [
            i
            for i, s in enumerate(self.streams)
            if i not in errors and i not in corrupted and not s.complete
        ]
        unechoed = sum(s.sent - s.received for i, s in enumerate(self.streams) if i in errors)
        return Outcome(len(self.streams), errors, corrupted, incomplete, unechoed)

    def close(self) -> None:
        for stream in self.streams:
            stream.sock.close()


@contextlib.contextmanager
def streaming(
    port: int, count: int, *, window: int = WINDOW, deadline: float = 45.0
) -> Iterator[StreamingClients]:
    """Open ``count`` checksummed streams to the echo service on ``port``.

    The streams run until :meth:`StreamingClients.finish`; on leaving, the
    driver is stopped (if still running) and every socket is closed.
    """
    clients = StreamingClients(port, count, window, deadline)
    try:
        yield clients
    finally:
        clients.driver.stopping.set()
        clients.driver.join(clients.driver.deadline + 5)
        clients.close()
