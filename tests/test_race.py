"""Recipients racing: one service wanted by two, and two services taken at once."""

from __future__ import annotations

import re
import signal

import pytest

from harness.procs import Proc, process_state, takeover
from harness.procs import free_port as another_port
from harness.waiting import wait_until
from services import holders, listener_inode, run_app
from streaming import streaming

STOP_AFTER_ADOPT = {"TAKEOVER_FAULTS": "recipient.adopted=stop"}


def single_error(proc: Proc) -> str:
    """The one error line of a failed ``takeover take``."""
    assert proc.wait() == 1, proc.output()
    lines = proc.output().splitlines()
    assert len(lines) == 1 and lines[0].startswith("takeover: error: "), lines
    return lines[0]


def test_second_recipient_is_told_busy(control, free_port, procs):
    """While a is in transit a second recipient is told "busy"; after, "no such service"."""
    port_b = another_port()
    origin = run_app(procs, free_port, control, "--port-b", str(port_b))
    inode = listener_inode(free_port)
    with streaming(free_port, 10) as clients:
        clients.wait_all_echoing()
        first = takeover("take", control, "--service", "a", env=STOP_AFTER_ADOPT)
        procs.append(first)
        wait_until(lambda: process_state(first.pid) == "T", what="the first recipient to stop")

        second = takeover("take", control, "--service", "a")
        procs.append(second)
        error = single_error(second)
        assert "service 'a' is busy: it is already moving to another recipient" in error

        first.signal(signal.SIGCONT)
        first.expect(r"^took a: 10 connections")
        first.expect(r"^serving 1 service\(s\) at " + re.escape(f"{control}.{first.pid}") + " ")
        third = takeover("take", control, "--service", "a")
        procs.append(third)
        assert "no service named 'a' (published: b)" in single_error(third)

        assert [p.pid for p in holders(inode, origin, first, second, third)] == [first.pid]
        clients.wait_progress()
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    assert origin.popen.poll() is None  # still serving b


@pytest.mark.parametrize("round_", range(3))
def test_simultaneous_recipients_for_one_service(control, free_port, procs, round_):
    """Two recipients started together for a: exactly one takes it, the other is told why not."""
    port_b = another_port()
    origin = run_app(procs, free_port, control, "--port-b", str(port_b))
    inode = listener_inode(free_port)
    with streaming(free_port, 10) as clients:
        clients.wait_all_echoing()
        racers = [takeover("take", control, "--service", "a") for _ in range(2)]
        procs.extend(racers)
        # A winner says so and keeps serving; a loser exits.
        wait_until(
            lambda: all(r.popen.poll() is not None or "took a:" in r.output() for r in racers),
            what="both recipients to finish or take a",
        )
        winners = [r for r in racers if "took a:" in r.output()]
        assert len(winners) == 1, [r.output() for r in racers]
        (winner,) = winners
        (loser,) = [r for r in racers if r is not winner]
        error = single_error(loser)
        assert "service 'a' is busy" in error or "no service named 'a'" in error, error
        wait_until(lambda: "serving 1 service(s) at " in winner.output(), what="the winner")
        assert [p.pid for p in holders(inode, origin, *racers)] == [winner.pid]
        clients.wait_progress()
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []


@pytest.mark.parametrize("overlap", ["simultaneous", "b while a is in transit"])
def test_two_services_taken_at_once(control, free_port, procs, overlap):
    """Two recipients take a and b at the same time: both succeed, each serves its own."""
    port_b = another_port()
    origin = run_app(procs, free_port, control, "--port-b", str(port_b))
    inode_a, inode_b = listener_inode(free_port), listener_inode(port_b)
    with streaming(free_port, 10) as clients_a, streaming(port_b, 10) as clients_b:
        clients_a.wait_all_echoing()
        clients_b.wait_all_echoing()
        env = STOP_AFTER_ADOPT if overlap != "simultaneous" else None
        take_a = takeover("take", control, "--service", "a", env=env)
        procs.append(take_a)
        if env is not None:
            wait_until(lambda: process_state(take_a.pid) == "T", what="a's recipient to stop")
        take_b = takeover("take", control, "--service", "b")
        procs.append(take_b)
        take_b.expect(r"^took b: 10 connections")
        if env is not None:
            take_a.signal(signal.SIGCONT)
        take_a.expect(r"^took a: 10 connections")
        for proc in (take_a, take_b):
            proc.expect(r"^serving 1 service\(s\) at ")
        # Both services gone: the originator exits.
        assert origin.wait() == 0, origin.output()
        assert [p.pid for p in holders(inode_a, origin, take_a, take_b)] == [take_a.pid]
        assert [p.pid for p in holders(inode_b, origin, take_a, take_b)] == [take_b.pid]
        clients_a.wait_progress()
        clients_b.wait_progress()
        outcomes = [clients_a.finish(), clients_b.finish()]
    for outcome in outcomes:
        assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
