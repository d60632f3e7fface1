"""Partial moves: what can move moves, what cannot drains in the old process.

Real processes and clients: a service with one TLS connection among plain
ones (tests/apps/mixed.py), an asyncio streams server (tests/apps/streams.py,
whose connections a coroutine serves), and a partial move that rolls back.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from drainclients import LineClient, start_mixed
from drainfaults import DRAIN_CELLS, run_drain_cell
from faultmatrix import wait_stopped
from harness.procs import APPS, PYTHON, Proc, list_fds, takeover
from harness.waiting import wait_until
from services import holders, listener_inode
from streaming import streaming

DRAIN = 3.0


def test_tls_connection_drains_while_the_plain_ones_move(workdir, control, free_port, procs):
    """50 plain streams move; the TLS one stays, is served, then told bye at the deadline."""
    origin, cert = start_mixed(workdir, control, free_port, procs)
    with streaming(free_port, 50) as clients:
        tls = LineClient(free_port)
        tls.starttls(cert)
        assert tls.ask(b"pid") == f"pid {origin.pid}".encode()
        clients.wait_all_echoing()
        inode = listener_inode(free_port)
        recipient = takeover("take", "--drain", str(DRAIN), control)
        procs.append(recipient)
        took = recipient.expect(r"^took mixed: ")
        assert re.match(
            r"took mixed: 50 connections \(1 draining in the old process for up to 3 s\), ",
            took.string,
        ), took.string
        moved_at = time.monotonic()
        # The listener and the 50 streams are the recipient's; the TLS session the old one's.
        wait_until(lambda: holders(inode, origin, recipient) == [recipient], what="the listener")
        clients.wait_progress()
        assert tls.ask(b"pid") == f"pid {origin.pid}".encode()
        assert tls.ask(b"still here") == b"still here"
        # `list` (the recipient answers) says where the rest drains.
        listing = takeover("list", control)
        procs.append(listing)
        assert listing.wait() == 0
        assert re.search(
            rf"^mixed\s+available\s+50\s+asyncio\s+127\.0\.0\.1:{free_port}\s+"
            rf"1 in pid {origin.pid}, \d s left$",
            listing.output(),
            re.M,
        ), listing.output()
        fresh = LineClient(free_port)
        assert fresh.ask(b"pid") == f"pid {recipient.pid}".encode()
        fresh.close()
        # The deadline: a polite goodbye over TLS, then a clean close (no reset).
        assert tls.line() == b"bye"
        # Not before the deadline (after it, only the machine's load decides).
        assert time.monotonic() - moved_at >= DRAIN - 0.5
        with pytest.raises(EOFError):
            tls.line()
        tls.close()
        assert origin.wait(DRAIN + 10) == 0, origin.output()
        assert "takeover.moves: moved 'mixed' to pid" in origin.output()
        assert "(1 draining here for up to 3 s)" in origin.output()
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0


def test_without_drain_the_move_is_refused_with_advice(workdir, control, free_port, procs):
    origin, cert = start_mixed(workdir, control, free_port, procs)
    tls = LineClient(free_port)
    tls.starttls(cert)
    before = list_fds(origin.pid)
    refused = takeover("take", control)
    procs.append(refused)
    assert refused.wait() == 1
    assert "or take with --drain SECONDS" in refused.output(), refused.output()
    assert tls.ask(b"after") == b"after"
    assert list_fds(origin.pid) == before
    tls.close()


def test_a_partial_move_that_rolls_back_keeps_everything(workdir, control, free_port, procs):
    """The recipient dies before committing: the listener and every connection stay."""
    origin, cert = start_mixed(workdir, control, free_port, procs)
    with streaming(free_port, 10) as clients:
        tls = LineClient(free_port)
        tls.starttls(cert)
        clients.wait_all_echoing()
        inode = listener_inode(free_port)
        dying = takeover(
            "take", "--drain", "30", control, env={"TAKEOVER_FAULTS": "recipient.adopted=kill"}
        )
        procs.append(dying)
        assert dying.wait() == -signal.SIGKILL
        wait_until(lambda: "did not move 'mixed'" in origin.output(), what="the rollback")
        assert holders(inode, origin) == [origin]
        clients.wait_progress()
        assert tls.ask(b"pid") == f"pid {origin.pid}".encode()
        fresh = LineClient(free_port)
        assert fresh.ask(b"pid") == f"pid {origin.pid}".encode()
        fresh.close()
        # A later partial move works, and leaves the TLS session behind again.
        recipient = takeover("take", "--drain", "30", control)
        procs.append(recipient)
        recipient.expect(r"^took mixed: 10 connections \(1 draining")
        clients.wait_progress()
        outcome = clients.finish()
        tls.close()  # the old process drains its last connection, and exits
        assert origin.wait(10) == 0
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0


def test_a_streams_server_moves_its_listener_and_drains_its_connections(control, free_port, procs):
    """client_connected_cb: the listener moves at once; old connections end in the old process."""
    argv = [PYTHON, os.path.join(APPS, "streams.py"), "--port", str(free_port)]
    origin = Proc([*argv, "--control", control, "--drain", "10"])
    procs.append(origin)
    origin.expect("control")
    old = [LineClient(free_port) for _ in range(5)]
    for client in old:
        assert client.ask(b"a") == f"1 {origin.pid} a".encode()
    recipient = takeover("take", control)
    procs.append(recipient)
    recipient.expect(
        r"^took streams: 0 connections \(5 draining in the old process for up to 10 s\)"
    )
    new = LineClient(free_port)
    assert new.ask(b"b") == f"1 {recipient.pid} b".encode()
    for client in old:
        assert client.ask(b"c") == f"2 {origin.pid} c".encode()
        client.close()
    # Its last connection closed: the old process exits long before the deadline.
    origin.expect(rf"pid {origin.pid} drained", timeout=5)
    assert origin.wait(5) == 0
    assert new.ask(b"d") == f"2 {recipient.pid} d".encode()
    new.close()
    # The successor drains by default too: the next move works the same.
    successor = takeover("take", control)
    procs.append(successor)
    successor.expect(r"^took streams: 0 connections")
    assert recipient.wait(5) == 0
    successor.signal(signal.SIGTERM)
    assert successor.wait() == 0


def test_a_streams_connection_accepted_after_the_dry_run_drains_too(control, free_port, procs):
    """The old process accepts until it pauses: a stream accepted between the dry
    run and the pause cannot move either, and stays to drain with the others."""
    argv = [PYTHON, os.path.join(APPS, "streams.py"), "--port", str(free_port)]
    origin = Proc([*argv, "--control", control, "--drain", "10"])
    procs.append(origin)
    origin.expect("control")
    early = LineClient(free_port)
    assert early.ask(b"a") == f"1 {origin.pid} a".encode()
    # The recipient stops once the sockets went ahead: the dry run is over and
    # the service not yet paused.
    recipient = takeover("take", control, env={"TAKEOVER_FAULTS": "recipient.ahead-received=stop"})
    procs.append(recipient)
    wait_stopped(recipient, "recipient.ahead-received")
    late = LineClient(free_port)
    assert late.ask(b"b") == f"1 {origin.pid} b".encode()
    recipient.signal(signal.SIGCONT)
    recipient.expect(
        r"^took streams: 0 connections \(2 draining in the old process for up to 10 s\)"
    )
    new = LineClient(free_port)
    assert new.ask(b"c") == f"1 {recipient.pid} c".encode()
    for client, count in ((early, 2), (late, 2)):
        assert client.ask(b"d") == f"{count} {origin.pid} d".encode()
        client.close()
    origin.expect(rf"pid {origin.pid} drained", timeout=5)
    assert origin.wait(5) == 0
    new.close()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "cell", DRAIN_CELLS, ids=lambda c: f"{c.name.replace(' ', '-')}:{c.victim}"
)
def test_partial_move_fault_matrix(cell, workdir, control, free_port, procs):
    """A process killed mid-move during a partial move: the listener, the streams and the
    TLS session end up where docs/faults.md says."""
    run_drain_cell(cell, workdir, control, free_port, procs)


def test_at_the_deadline_a_stream_is_closed_with_a_fin_not_a_reset(control, free_port, procs):
    """A client that keeps sending past the deadline: its echoes, then EOF; never a reset."""
    argv = [PYTHON, os.path.join(APPS, "streams.py"), "--port", str(free_port)]
    origin = Proc([*argv, "--control", control, "--drain", "1"])
    procs.append(origin)
    origin.expect("control")
    client = LineClient(free_port)
    assert client.ask(b"a") == f"1 {origin.pid} a".encode()
    recipient = takeover("take", control)
    procs.append(recipient)
    recipient.expect(r"^took streams: 0 connections \(1 draining")
    answered = 1
    with pytest.raises(EOFError):
        while True:  # ConnectionResetError here would fail the test
            client.sock.sendall(b"more\n")
            assert client.line().endswith(b" more")
            answered += 1
            time.sleep(0.01)
    assert answered > 10
    client.close()
    assert origin.wait(10) == 0
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0
