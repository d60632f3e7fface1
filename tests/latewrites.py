"""Writers outside a service, seen from its clients: the "write during transit" column.

A writer outside the service (tests/apps/pusher.py, or twisted_pusher.py) sends
numbered lines to every connection. :class:`Feeds` are its clients: each
checks that its lines are numbered 0, 1, 2... without a gap or a repeat, and
counts them by the process that wrote them, so that a test can compare those
counts with the counts of writes each writer believes succeeded: a line a
writer counted and no client got was silently lost.

:func:`run_write_cell` plays one cell of the column: the recipient stops at
its step, the writer writes one line to every connection, the recipient goes
on, and the cell checks which of the two promised outcomes happened: the
move rolled back and the lines went out from the originator, or the writer
was told (``ConnectionMovedError``, or ``is_closing()`` first).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import time
from collections import Counter

from faultmatrix import ROLLED_BACK, SENT, wait_stopped
from harness.procs import APPS, PYTHON, Proc, list_fds, takeover
from harness.waiting import wait_until
from services import holders, listener_inode


class Feeds:
    """``count`` clients of a line writer on ``port``."""

    def __init__(self, port: int, count: int) -> None:
        self.sockets = [
            socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)
        ]
        self.buffers = {s: bytearray() for s in self.sockets}
        self.lines: dict[socket.socket, list[tuple[int, int]]] = {s: [] for s in self.sockets}
        self.errors: list[str] = []

    def __enter__(self) -> Feeds:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sockets:
            s.close()

    @property
    def received(self) -> int:
        return sum(len(lines) for lines in self.lines.values())

    def by_writer(self) -> Counter[int]:
        """Lines received, by the pid that wrote them."""
        return Counter(pid for lines in self.lines.values() for _, pid in lines)

    def by_client(self) -> dict[str, Counter[int]]:
        """Lines received by each client (its port), by the pid that wrote them."""
        return {
            str(s.getsockname()[1]): Counter(pid for _, pid in self.lines[s]) for s in self.sockets
        }

    def read(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout``."""
        with selectors.DefaultSelector() as selector:
            for s in self.sockets:
                selector.register(s, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(remaining):
                    self._read_one(key.fileobj)  # type: ignore[arg-type]

    def _read_one(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            self.errors.append(f"{sock.getsockname()}: {exc}")
            data = b""
        if not data:
            raise EOFError(f"a client's connection closed: {self.errors}")
        buffer = self.buffers[sock]
        buffer += data
        *complete, rest = bytes(buffer).split(b"\n")
        buffer[:] = rest
        lines = self.lines[sock]
        for line in complete:
            number, pid = map(int, line.split())
            assert number == len(lines), (
                f"line {number} after {len(lines)} lines: a gap or a repeat"
            )
            lines.append((number, pid))

    def read_to_end(self, timeout: float = 20.0) -> None:
        """Read until every connection has been closed by the server."""
        open_ = set(self.sockets)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for s in open_:
                selector.register(s, selectors.EVENT_READ)
            while open_:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(open_)} connections still open"
                for key, _ in selector.select(remaining):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        self._read_one(sock)
                    except EOFError:
                        selector.unregister(sock)
                        open_.discard(sock)
        assert all(not b for b in self.buffers.values()), "a partial line at the end"

    def wait_for(self, total: int, timeout: float = 20.0) -> None:
        """Read until ``total`` lines in all have come, then check that no more come."""
        deadline = time.monotonic() + timeout
        while self.received < total and time.monotonic() < deadline:
            self.read(0.05)
        assert self.received == total, f"{self.received} lines came; {total} were written"
        self.read(0.3)
        assert self.received == total, f"{self.received} lines came; only {total} were written"


def burst(proc: Proc) -> tuple[int, int, int]:
    """SIGUSR1 to a writer: one line to every connection; (written, moved, closed)."""
    proc.signal(signal.SIGUSR1)
    found = proc.expect(r"^pushed ok=(\d+) moved=(\d+) closed=(\d+)$")
    return int(found[1]), int(found[2]), int(found[3])


def run_write_cell(
    step_name: str,
    point: str,
    outcome: str,
    clients: int,
    secret: str,
    control: str,
    port: int,
    procs: list[Proc],
    *,
    app: str = "pusher.py",
    take_args: tuple[str, ...] = (),
) -> None:
    """One cell: the recipient stops at ``point``, the writer writes, and ``outcome`` holds."""
    env = {"PUSHER_ON_SIGNAL": "1"}
    argv = [PYTHON, os.path.join(APPS, app), "--port", str(port), "--control", control]
    origin = Proc([*argv, "--secret-file", secret], env=env)
    procs.append(origin)
    origin.expect("control")
    with Feeds(port, clients) as feeds:
        written: Counter[int] = Counter()
        # Until every connection has been accepted and fed once.
        while (result := burst(origin))[0] < clients:
            written[origin.pid] += result[0]
        written[origin.pid] += result[0]
        feeds.wait_for(sum(written.values()))
        inode = listener_inode(port)
        before = list_fds(origin.pid)
        recipient = takeover(
            "take",
            control,
            "--secret-file",
            secret,
            *take_args,
            env={**env, "TAKEOVER_FAULTS": f"{point}=stop"},
        )
        procs.append(recipient)
        wait_stopped(recipient, point)
        ok, moved, closed = burst(origin)
        written[origin.pid] += ok
        recipient.signal(signal.SIGCONT)
        if outcome == ROLLED_BACK:
            assert (ok, moved, closed) == (clients, 0, 0), (step_name, ok, moved, closed)
            assert recipient.wait() == 1, recipient.output()
            out = recipient.output()
            assert re.search(
                r"rolled 'pusher' back before this side could commit \(write\(\) on the "
                rf"connection from 127\.0\.0\.1:\d+.*, at {re.escape(app)}:\d+ in push_once, "
                "after the graph was pickled",
                out,
            ), out
            survivor = origin
            wait_until(lambda: list_fds(origin.pid) == before, what="the originator's fd table")
        else:
            recipient.expect(r"^serving 1 service\(s\) at ")
            assert origin.wait() == 0, origin.output()
            survivor = recipient
            if outcome == SENT:
                assert (ok, moved, closed) == (clients, 0, 0), (step_name, ok, moved, closed)
            else:
                # Nothing written; each write raised, or is_closing() said so first.
                assert ok == 0 and moved + closed == clients, (step_name, ok, moved, closed)
                if point == "recipient.started":
                    # Committed, not yet released: write() itself was refused.
                    assert moved == clients, (ok, moved, closed)
        assert [p.pid for p in holders(inode, origin, recipient)] == [survivor.pid]
        # The survivor feeds every connection, counting on from where the lines stopped.
        ok, moved, closed = burst(survivor)
        assert (ok, moved, closed) == (clients, 0, 0)
        written[survivor.pid] += ok
        feeds.wait_for(sum(written.values()))
        assert feeds.by_writer() == +written, (feeds.by_writer(), written)
    for proc in (origin, recipient):
        if proc.popen.poll() is None:
            proc.signal(signal.SIGTERM)
            proc.wait()
