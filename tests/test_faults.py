"""The fault matrix: every step of the conversation, four ways to fail, real processes.

For each step (a row of docs/faults.md) and each fault (a column): SIGKILL the
recipient there, SIGKILL the originator there, cut the control channel there,
or corrupt the next frame there (the last two with the man-in-the-middle relay
of tests/mitm.py), or write to every connection from outside the service while
the recipient is stopped there (tests/latewrites.py). Clients stream
checksummed data through the whole attempt (numbered lines from the writer,
in the last column).
Each cell checks which process serves the service afterwards, that the
clients of a surviving service saw no error and lost, duplicated or altered no
byte, that the survivor leaked no descriptor, and that never two processes
hold the service's listening socket.

The rows, the columns and the expected outcome of every cell are declared in
tests/faultmatrix.py (which also plays a cell), and docs/faults.md is
generated from them here (``FAULTS_WRITE_DOCS=1`` rewrites it; otherwise a
test checks it is up to date), so the table says what is asserted.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from drainfaults import CLIENTS as DRAIN_CLIENTS
from drainfaults import DRAIN as DRAIN_SECONDS
from drainfaults import DRAIN_CELLS
from faultmatrix import (
    FAULTS,
    FULL,
    KILL_ORIGINATOR,
    KILL_RECIPIENT,
    KNOWN_GAPS,
    LIGHT,
    NONE,
    STEP,
    STEPS,
    WRITE,
    WRITE_OUTCOMES,
    applicable,
    expected,
    run_cell,
    secret_file,
    wait_stopped,
)
from harness.echo import echo
from harness.procs import ROOT, list_fds, process_state, run_example, takeover
from harness.waiting import wait_until
from latewrites import run_write_cell
from mitm import TO_ORIGINATOR
from services import holders, listener_inode, service_fds
from streaming import streaming

DOCS = os.path.join(ROOT, "docs", "faults.md")

CELLS = [
    pytest.param(
        step.name,
        fault,
        id=f"{step.name.replace(' ', '-')}:{fault.replace(' ', '-')}",
        marks=[pytest.mark.xfail(reason=KNOWN_GAPS[(step.name, fault)], strict=True)]
        if (step.name, fault) in KNOWN_GAPS
        else [],
    )
    for step in STEPS
    for fault in FAULTS
    if applicable(step, fault)
]


# -- the matrix ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("step", "fault"), CELLS)
def test_fault_matrix(step, fault, workdir, control, free_port, procs):
    """One cell of the fault matrix: the service runs exactly once, clients unharmed."""
    if fault == WRITE:
        row = STEP[step]
        assert row.recipient_point is not None
        outcome = WRITE_OUTCOMES[step][1]
        secret = secret_file(workdir)
        run_write_cell(
            step, row.recipient_point, outcome, row.clients, secret, control, free_port, procs
        )
        return
    result = run_cell(STEP[step], fault, workdir, control, free_port, procs)
    assert result.server == expected(STEP[step], fault)


TCP_CELLS = [
    pytest.param(name, fault, id=f"{name.replace(' ', '-')}:{fault.replace(' ', '-')}")
    for name in ("fds sent", "adopted", "committed")
    for fault in (KILL_RECIPIENT, KILL_ORIGINATOR)
    if applicable(STEP[name], fault)
]


@pytest.mark.parametrize(("step", "fault"), TCP_CELLS)
def test_fault_matrix_over_tcp(step, fault, workdir, control, free_port, procs):
    """The kill cells after the graph went out, over a TCP control channel: same outcomes."""
    result = run_cell(STEP[step], fault, workdir, control, free_port, procs, tcp=True)
    assert result.server == expected(STEP[step], fault)


# -- the table in the docs -------------------------------------------------------


def render() -> str:
    """docs/faults.md, from :data:`STEPS`, :data:`EXPECTED` and :data:`KNOWN_GAPS`."""
    lines = [
        "# The fault matrix",
        "",
        "Generated from `tests/test_faults.py`: `FAULTS_WRITE_DOCS=1 pytest tests/test_faults.py`",
        "rewrites it, and a test fails if it is out of date, so each cell states what the",
        "test of that cell asserts. Real processes: `examples/echo.py`",
        "with a shared secret as the originator, `takeover take` as the recipient, and",
        f"{LIGHT} clients (or {FULL} in the rows after the graph has gone out) streaming",
        "checksummed lines through the service during the whole attempt.",
        "",
        "Columns: SIGKILL of the recipient or of the originator when it stops itself at the",
        "step's `TAKEOVER_FAULTS` point; the control channel cut by a relay between the two",
        "(which passes descriptors through with SCM_RIGHTS) before the step's frame, or that",
        "frame with one byte flipped (mid-JSON; for mid-graph, mid-pickle). The last column",
        "plays `tests/apps/pusher.py` instead of the echo: while the recipient is stopped at",
        "its point, a task outside the service writes one numbered line to every connection.",
        "",
        "Each cell: **who serves** afterwards; then `errors/clients` (streams that saw an",
        "error); every cell also asserts no byte lost, duplicated or altered on any stream",
        "(bytes that came back before a cut included), no descriptor leaked by the survivor",
        "(`/proc/PID/fd` before and after), and at most one live process holding the",
        "listening socket.",
        "",
        "| step | frame | " + " | ".join(FAULTS) + " |",
        "|---|---|" + "---|" * len(FAULTS),
    ]
    for step in STEPS:
        direction, kind = step.frame
        arrow = "R→O" if direction == TO_ORIGINATOR else "O→R"
        frame = f"{'inside ' if step.inside else ''}{kind.name} {arrow}"
        cells = []
        for fault in FAULTS:
            if not applicable(step, fault):
                cells.append("—")
                continue
            want = expected(step, fault)
            errors = step.clients if want == NONE else 0
            cell = f"**{want}**, {errors}/{step.clients}"
            if fault == WRITE:
                cell = f"**{want}**, {WRITE_OUTCOMES[step.name][1]}"
            if (step.name, fault) in KNOWN_GAPS:
                cell = "**both** (known gap, xfail)"
            cells.append(cell)
        lines.append(f"| {step.name} | {frame} | " + " | ".join(cells) + " |")
    lines += ["", "Fault points (`TAKEOVER_FAULTS=POINT=stop`) per row:", ""]
    for step in STEPS:
        points = ", ".join(
            f"`{p}`" for p in (step.recipient_point, step.originator_point) if p is not None
        )
        lines.append(f"- {step.name}: {points or '(relay only)'}")
    lines += [
        "",
        "Notes:",
        "",
        "- **none**: the process that alone held the service was SIGKILLed, so its",
        "  connections died with it, as they would with no move in progress; the streams",
        "  still got back only bytes they had sent, in order, up to the cut.",
        "- The commit point is the move's arbiter (a one-byte memfd sent ahead of the",
        "  service's descriptors, decided once under flock): the recipient records COMMITTED",
        "  there once it has adopted the graph, then starts, then answers COMMITTED; the",
        "  originator records ROLLED_BACK there before it resumes for any reason; the first",
        "  wins. So whenever COMMITTED does not arrive intact (graph sent / cut channel and",
        "  corrupt frame), the originator asks the arbiter, finds COMMITTED and releases.",
        "- Over a TCP control channel (descriptors on the same-host fd transport), the kill",
        "  cells of the fds sent, adopted and committed rows are run too, with the same",
        "  outcomes (`test_fault_matrix_over_tcp`).",
        "- Also asserted, outside the table: an originator SIGKILLed after the graph and fds",
        "  went out (stopped at `originator.fds-sent`, or while it waits for COMMITTED)",
        "  leaves the recipient serving 50 streams with no error; a recipient stopped past a",
        "  1 s `--step-timeout` (at `recipient.connected`, `fds-received` or `adopted`) is",
        "  rolled back while it is still stopped, and when it wakes finds ROLLED_BACK in the",
        "  arbiter and starts nothing.",
        "- **write during transit**: the cell says who serves, then what became of the",
        "  lines the outside writer wrote while the recipient was stopped. **sent**: the",
        "  service was not paused yet, so they went out at once, and the move went on.",
        "  **rolled back**: the service was in transit (its graph pickled); the write",
        "  recorded ROLLED_BACK in the arbiter first, so the lines went out from the",
        "  originator when it resumed, and the recipient failed with a message naming the",
        "  connection and the writer's code (`pusher.py:LINE in push_once`). **told**: the",
        "  recipient had committed; `write()` raised `ConnectionMovedError` (at",
        "  `started`, where the originator still held its copies) or `is_closing()` was",
        "  already true, so the writer wrote nothing. Every cell asserts that the clients'",
        "  lines are numbered without a gap or a repeat and that each process's count of",
        "  lines its writer believes it wrote equals the count the clients got from it.",
    ]
    lines += [
        "",
        "## Partial moves (`takeover take --drain`)",
        "",
        f"`tests/apps/mixed.py` with {DRAIN_CLIENTS} checksummed plain streams and one TLS",
        f"session; the recipient takes it with `--drain {DRAIN_SECONDS:g}`, so the listener",
        "and the streams move and the TLS session stays to drain. The process named is",
        "SIGKILLed where it stops itself at the point (`tests/test_drain.py`).",
        "",
        "| step | killed | point | listener and streams | TLS session |",
        "|---|---|---|---|---|",
    ]
    tls = {
        "served": "served by the originator",
        "bye": "served by the originator, then `bye` at the deadline",
        "cut": "cut (it died with the originator)",
    }
    for cell in DRAIN_CELLS:
        errors = DRAIN_CLIENTS if cell.server == "none" else 0
        lines.append(
            f"| {cell.name} | {cell.victim} | `{cell.point}` | **{cell.server}**, "
            f"{errors}/{DRAIN_CLIENTS} | {tls[cell.tls]} |"
        )
    lines += [
        "",
        "A partial move that rolls back keeps everything in the originator, the",
        "listener included; one that commits leaves the TLS session to the originator,",
        "which serves it until it closes or the deadline passes, then says `bye` and",
        "closes it with close_notify: never a reset.",
    ]
    lines += ["", "Known gaps:", ""]
    for (name, fault), reason in KNOWN_GAPS.items():
        lines.append(f"- {name} / {fault}: {reason}.")
    if not KNOWN_GAPS:
        lines.append("- none: every cell above is asserted as shown.")
    return "\n".join(lines) + "\n"


def test_docs_table_is_the_matrix():
    """docs/faults.md is the table this module asserts (FAULTS_WRITE_DOCS=1 regenerates it)."""
    text = render()
    if os.environ.get("FAULTS_WRITE_DOCS"):
        with open(DOCS, "w") as f:
            f.write(text)
    with open(DOCS) as f:
        assert f.read() == text, "docs/faults.md is out of date: run with FAULTS_WRITE_DOCS=1"


# -- an originator that dies mid-move --------------------------------------------


@pytest.mark.parametrize("when", ["originator.fds-sent", "awaiting COMMITTED"])
def test_originator_dying_mid_move_leaves_the_recipient_serving(
    when, workdir, control, free_port, procs
):
    """Originator killed after sending graph and fds: the recipient serves, 50 clients unharmed."""
    secret = secret_file(workdir)
    origin_env = None if when == "awaiting COMMITTED" else {"TAKEOVER_FAULTS": f"{when}=stop"}
    origin = run_example("echo", free_port, control, "--secret-file", secret, env=origin_env)
    procs.append(origin)
    with streaming(free_port, FULL) as clients:
        clients.wait_all_echoing()
        inode = listener_inode(free_port)
        recipient_env = None
        if when == "awaiting COMMITTED":
            # The recipient holds everything and stops before it commits,
            # while the originator waits for COMMITTED; the originator dies
            # then, and the recipient's COMMITTED meets a closed channel.
            recipient_env = {"TAKEOVER_FAULTS": "recipient.adopted=stop"}
        recipient = takeover("take", control, "--secret-file", secret, env=recipient_env)
        procs.append(recipient)
        if when == "awaiting COMMITTED":
            wait_stopped(recipient, "recipient.adopted")
        else:
            wait_stopped(origin, when)
        origin.signal(signal.SIGKILL)
        assert origin.wait() == -signal.SIGKILL
        recipient.signal(signal.SIGCONT)

        recipient.expect(r"^serving 1 service\(s\) at ")
        if when == "awaiting COMMITTED":
            assert "originator closed before COMMITTED for 'echo'" in recipient.output()
        assert [p.pid for p in holders(inode, origin, recipient)] == [recipient.pid]
        moved = service_fds(recipient.pid, free_port)
        assert len(moved) == 1 + FULL
        wait_until(
            # 7 of its own, and the service's own epoll instance.
            lambda: len(list_fds(recipient.pid)) == len(moved) + 8,
            what="the recipient's fd table to settle",
        )
        clients.wait_progress()
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as fresh:
            assert echo(fresh, b"orphan\n") == b"orphan\n"
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    # It serves at the dead originator's control path: the next move works too.
    successor = takeover("take", control, "--secret-file", secret)
    procs.append(successor)
    successor.expect(r"^took echo: \d+ connections")
    assert recipient.wait() == 0, recipient.output()
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as fresh:
        assert echo(fresh, b"again\n") == b"again\n"


# -- a recipient that stalls -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["recipient.connected", "recipient.fds-received", "recipient.adopted"]
)
def test_stalled_recipient_is_rolled_back_after_the_step_timeout(
    point, workdir, control, free_port, procs
):
    """A recipient stopped past the originator's 1 s step timeout: rollback, clients unharmed."""
    secret = secret_file(workdir)
    origin = run_example("echo", free_port, control, "--secret-file", secret, "--step-timeout", "1")
    procs.append(origin)
    with streaming(free_port, LIGHT) as clients:
        clients.wait_all_echoing()
        inode = listener_inode(free_port)
        before = list_fds(origin.pid)
        stalled = takeover(
            "take", control, "--secret-file", secret, env={"TAKEOVER_FAULTS": f"{point}=stop"}
        )
        procs.append(stalled)
        wait_stopped(stalled, point)
        # Rolled back after the timeout, while the recipient is still stopped.
        wait_until(
            lambda: "sent nothing for 1 s" in origin.output(), timeout=10, what="the timeout"
        )
        wait_until(lambda: list_fds(origin.pid) == before, timeout=5, what="the rollback")
        assert process_state(stalled.pid) == "T"
        clients.wait_progress()
        listing = takeover("list", "--json", control, "--secret-file", secret)
        procs.append(listing)
        listing.expect(r'"state": "available"')
        # Woken up, the recipient finds the channel closed and starts nothing.
        stalled.signal(signal.SIGCONT)
        assert stalled.wait() == 1, stalled.output()
        assert "takeover: error: " in stalled.output()
        if point == "recipient.adopted":
            # It held everything, and found ROLLED_BACK in the arbiter.
            assert "the originator rolled 'echo' back before this side" in stalled.output()
        assert [p.pid for p in holders(inode, origin, stalled)] == [origin.pid]
        assert list_fds(origin.pid) == before
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
