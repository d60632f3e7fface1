"""The shortest real path: one echo connection moves to `takeover take`."""

from __future__ import annotations

import socket

from harness.procs import run_example, takeover


def test_echo_connection_survives_one_move(control, free_port, procs):
    """A connection opened before the move keeps echoing after it, partial line included."""
    origin = run_example("echo", free_port, control)
    procs.append(origin)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        client.sendall(b"before\npart")
        assert client.recv(100) == b"before\n"
        recipient = takeover("take", control)
        procs.append(recipient)
        recipient.expect(r"took echo: 1 connections")
        assert origin.wait() == 0
        client.sendall(b"ial\n")
        assert client.recv(100) == b"partial\n"
