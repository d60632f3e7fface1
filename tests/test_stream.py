"""Checksummed streams both ways through examples/echo.py while it moves ten times."""

from __future__ import annotations

import re
import signal
import socket

import pytest

from harness.procs import run_example, takeover
from harness.waiting import wait_until
from streaming import Stream, Streams, TightLoop

CLIENTS = 50
MOVES = 10
DEADLINE = 45.0  # seconds for the whole exchange, moves included


RUNTIMES = [
    pytest.param("echo", (), id="asyncio"),
    # examples/twisted_echo.py, taken by Twisted recipients (takeover.twisted).
    pytest.param("twisted_echo", ("--runtime", "twisted"), id="twisted"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("example", "take_args"), RUNTIMES)
def test_fifty_streams_survive_ten_moves(example, take_args, control, free_port, procs):
    """50 checksummed two-way streams and a connect loop see nothing of 10 moves in a row."""
    origin = run_example(example, free_port, control)
    procs.append(origin)
    streams: list[Stream] = []
    driver = loop = None
    try:
        for i in range(CLIENTS):
            streams.append(Stream(free_port, seed=i))
        driver = Streams(streams, DEADLINE)
        driver.start()
        # Every stream is accepted and echoing before the first move, so that
        # each move carries all 50 as established connections.
        wait_until(
            lambda: all(s.received for s in streams) or not driver.is_alive(),
            what="an echo on every stream",
        )
        assert driver.failure is None, driver.failure
        loop = TightLoop(free_port)
        loop.start()

        previous = origin
        moved: list[int] = []
        rounds_at_move: list[int] = []
        received_at_move: list[int] = []
        for _ in range(MOVES):
            recipient = takeover("take", control, *take_args)
            procs.append(recipient)
            match = recipient.expect(r"^took echo: (\d+) connections")
            moved.append(int(match.group(1)))
            recipient.expect(r"^serving 1 service\(s\) at " + re.escape(control) + " ")
            assert previous.wait() == 0, previous.output()
            rounds_at_move.append(loop.rounds)
            received_at_move.append(sum(s.received for s in streams))
            previous = recipient
    finally:
        if loop is not None:
            loop.stopping.set()
            loop.join(15)
        if driver is not None:
            driver.stopping.set()
            driver.join(DEADLINE)
        for stream in streams:
            stream.sock.close()

    assert not loop.is_alive() and not driver.is_alive()
    assert driver.failure is None, driver.failure
    errors = {i: repr(s.error) for i, s in enumerate(streams) if s.error is not None}
    assert errors == {}
    assert loop.errors == []
    for i, stream in enumerate(streams):
        assert stream.eof and stream.shut, f"stream {i} did not finish"
        assert stream.sent == stream.generated, f"stream {i} did not send everything"
        assert stream.received == stream.sent, f"stream {i}: {stream.received} != {stream.sent}"
        assert stream.received_hash.hexdigest() == stream.sent_hash.hexdigest(), f"stream {i}"
        assert stream.mismatch is None, f"stream {i}: {stream.mismatch}"
    # A recipient counts its connections as soon as it has started: the 50
    # streams plus at most two tight-loop ones, the current one (open at the
    # quiesce, or queued then and accepted as the service starts) and the one
    # before it if the client had closed it but the server had not yet reaped
    # it (EOF unread, or connection_lost() still pending). The client opens a
    # connection only once the previous one echoed, so a third cannot be held;
    # more than 52 would mean closed connections piling up across moves.
    assert all(CLIENTS <= n <= CLIENTS + 2 for n in moved), moved
    # The connect loop and the streams kept going across every move.
    assert all(b > a for a, b in zip(rounds_at_move, rounds_at_move[1:])), rounds_at_move
    assert all(b > a for a, b in zip(received_at_move, received_at_move[1:])), received_at_move
    assert loop.rounds > 0

    # The streams closed their connections; the last recipient still serves
    # the (now empty) listener, and a new client is echoed.
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as sock:
        sock.sendall(b"after\n")
        assert sock.recv(100) == b"after\n"
    previous.signal(signal.SIGTERM)
    assert previous.wait() == 0, previous.output()
