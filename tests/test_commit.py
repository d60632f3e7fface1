"""The commit point is the move's arbiter, not a frame.

A real originator (examples/echo.py) faces a recipient played by hand on a
plain socket: it authenticates, asks for the service, takes every frame and
descriptor the originator sends, and then answers in ways a correct
recipient never does. The arbiter decides what happens, whatever the frame
says: a COMMITTED the arbiter does not confirm rolls the service back, and a
REFUSED sent after COMMITTED was recorded there still releases it.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import time

from handshake import authenticate, write_secret
from harness.echo import echo
from harness.procs import list_fds, run_example, takeover
from harness.waiting import wait_until
from takeover._core import fds as _fds
from takeover._core import protocol as _protocol
from takeover._core.arbiter import COMMITTED, PENDING
from takeover._core.protocol import Kind, Message


class HandRecipient:
    """A recipient that speaks the protocol frame by frame, by hand."""

    def __init__(self, control: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(control)
        self.decoder = _protocol.FrameDecoder()
        self.pending: list[Message] = []
        self.fds: list[int] = []

    def close(self) -> None:
        _fds.close_all(self.fds)
        self.fds.clear()
        self.sock.close()

    def send(self, message: Message) -> None:
        self.sock.sendall(message.encode())

    def receive(self, timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and select.select([self.sock], [], [], remaining)[0], (
                "the originator said nothing"
            )
            data, fds = _fds.recv_with_fds(self.sock, 1 << 20)
            self.fds += fds
            assert data, "the originator closed the channel"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def authenticate(self) -> None:
        # No frame follows AUTHED until TAKE: nothing is left in a decoder.
        authenticate(self.sock)

    def take(self, name: str) -> int:
        """TAKE ``name`` and read everything up to the graph; return the arbiter's fd."""
        self.send(Message(Kind.TAKE, {"service": name}))
        message = self.receive()
        assert message.kind is Kind.FDS and message.body.get("arbiter") is True, message
        arbiter, expected, arrived = self.fds[0], message.body["ahead"], 0
        while arrived < expected:
            message = self.receive()
            assert message.kind is Kind.FDS, message
            arrived += message.body["count"]
        self.send(Message(Kind.AHEAD_READY, {"service": name, "count": arrived}))
        message = self.receive()
        assert message.kind is Kind.GRAPH and message.body["fds"] == 0, message
        return arbiter


def arbiter_state(fd: int) -> bytes:
    return os.pread(fd, 1, 0)


def record(fd: int, decision: bytes) -> None:
    """Record ``decision`` as the recipient does: its own description, under flock."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        fcntl.flock(own, fcntl.LOCK_EX)
        assert os.pread(own, 1, 0) == PENDING
        os.pwrite(own, decision, 0)
        fcntl.flock(own, fcntl.LOCK_UN)
    finally:
        os.close(own)


def test_committed_the_arbiter_does_not_confirm_rolls_back(workdir, control, free_port, procs):
    """COMMITTED with nothing recorded in the arbiter: the originator resumes and says why."""
    secret = write_secret(workdir)
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"before\n") == b"before\n"
        baseline = list_fds(origin.pid)
        recipient = HandRecipient(control)
        try:
            recipient.authenticate()
            arbiter = recipient.take("echo")
            assert arbiter_state(arbiter) == PENDING
            # Sent while the service is paused: it must come back from the originator.
            client.sendall(b"while paused\n")
            recipient.send(Message(Kind.COMMITTED, {"service": "echo"}))
            wait_until(
                lambda: "without recording it in the move's arbiter" in origin.output(),
                what="the originator to refuse the COMMITTED",
            )
            # The originator recorded its own decision before resuming.
            assert arbiter_state(arbiter) == b"R"
        finally:
            recipient.close()
        assert client.recv(100) == b"while paused\n"
        assert echo(client, b"after\n") == b"after\n"
        wait_until(lambda: list_fds(origin.pid) == baseline, what="the originator's fd table")
        listing = takeover("list", "--json", control, "--secret-file", secret)
        procs.append(listing)
        listing.expect(r'"state": "available"')
    assert origin.popen.poll() is None


def test_refused_after_committing_releases(workdir, control, free_port, procs):
    """REFUSED after COMMITTED was recorded: the arbiter wins and the originator lets go."""
    secret = write_secret(workdir)
    origin = run_example("echo", free_port, control, "--secret-file", secret)
    procs.append(origin)
    recipient = HandRecipient(control)
    try:
        recipient.authenticate()
        arbiter = recipient.take("echo")
        record(arbiter, COMMITTED)
        recipient.send(Message(Kind.REFUSED, {"service": "echo", "reason": "changed my mind"}))
        wait_until(
            lambda: "the recipient refused 'echo' after committing it" in origin.output(),
            what=f"the originator to release: {origin.output()}",
        )
    finally:
        recipient.close()
    # The echo example exits once its only service has moved away.
    assert origin.wait(10) == 0, origin.output()
