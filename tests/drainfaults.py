"""The fault matrix of partial moves (``takeover take --drain``): its cells, and how one is played.

tests/apps/mixed.py serves 10 checksummed plain streams and one TLS session;
a recipient takes it with ``--drain``, so the streams and the listener move
and the TLS session stays to drain. A process is SIGKILLed where it stops
itself at a fault point; the cell checks who then holds the listener and
serves the streams, and what became of the TLS session. tests/test_drain.py
runs every cell; tests/test_faults.py renders :data:`DRAIN_CELLS` into
docs/faults.md.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from drainclients import LineClient, start_mixed
from faultmatrix import wait_stopped
from harness.procs import Proc, takeover
from harness.waiting import wait_until
from services import holders, listener_inode
from streaming import streaming

CLIENTS = 10
DRAIN = 2.0


@dataclass(frozen=True)
class DrainCell:
    """A fault and what must hold after it."""

    name: str
    victim: str  # "recipient" or "originator"
    point: str
    server: str  # who serves the moved part afterwards: originator, recipient, none
    tls: str  # the TLS session: "served" (then "bye" at the deadline, or on), "cut"


DRAIN_CELLS = [
    DrainCell("graph sent", "recipient", "recipient.graph-received", "originator", "served"),
    DrainCell("adopted", "recipient", "recipient.adopted", "originator", "served"),
    DrainCell("started", "recipient", "recipient.started", "none", "bye"),
    DrainCell("fds sent", "originator", "originator.fds-sent", "recipient", "cut"),
    DrainCell("committed", "originator", "originator.committed-received", "recipient", "cut"),
]


def run_drain_cell(
    cell: DrainCell, workdir: str, control: str, port: int, procs: list[Proc]
) -> None:
    origin_env = {"TAKEOVER_FAULTS": f"{cell.point}=stop"} if cell.victim == "originator" else None
    origin, cert = start_mixed(workdir, control, port, procs, env=origin_env)
    with streaming(port, CLIENTS) as clients:
        tls = LineClient(port)
        tls.starttls(cert)
        clients.wait_all_echoing()
        inode = listener_inode(port)
        recipient_env = (
            {"TAKEOVER_FAULTS": f"{cell.point}=stop"} if cell.victim == "recipient" else None
        )
        recipient = takeover("take", "--drain", str(DRAIN), control, env=recipient_env)
        procs.append(recipient)
        victim = recipient if cell.victim == "recipient" else origin
        wait_stopped(victim, cell.point)
        victim.signal(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        if cell.server == "recipient":
            recipient.expect(r"^serving 1 service")
        elif cell.server == "originator":
            wait_until(lambda: "did not move 'mixed'" in origin.output(), what="the rollback")
        want = {"originator": [origin], "recipient": [recipient], "none": []}[cell.server]
        wait_until(lambda: holders(inode, origin, recipient) == want, what="the listener's holder")
        if cell.tls == "served":
            assert tls.ask(b"pid") == f"pid {origin.pid}".encode()
        elif cell.tls == "bye":
            # Committed, then the recipient died: the originator drains its part.
            assert tls.ask(b"pid") == f"pid {origin.pid}".encode()
            assert tls.line() == b"bye"
        else:
            try:
                tls.ask(b"pid")
                raise AssertionError("the TLS session outlived the only process that held it")
            except (EOFError, OSError):
                pass
        tls.close()
        if cell.server != "none":
            clients.wait_progress()
        outcome = clients.finish()
    if cell.server == "none":
        assert len(outcome.errors) == CLIENTS, outcome.errors
    else:
        assert outcome.errors == {}, outcome.errors
    assert outcome.corrupted == {} and outcome.incomplete == []
    for proc in (origin, recipient):
        proc.signal(signal.SIGTERM)
        proc.wait()
