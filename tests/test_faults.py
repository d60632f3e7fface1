"""The fault matrix: every step of the conversation, four ways to fail, real processes.

For each step (a row of docs/faults.md) and each fault (a column): SIGKILL the
recipient there, SIGKILL the originator there, cut the control channel there,
or corrupt the next frame there (the last two with the man-in-the-middle relay
of tests/mitm.py). Clients stream checksummed data through the whole attempt.
Each cell checks which process serves the service afterwards, that the
clients of a surviving service saw no error and lost, duplicated or altered no
byte, that the survivor leaked no descriptor, and that never two processes
hold the service's listening socket.

The expected outcome of every cell is declared in :data:`CELLS`, and
docs/faults.md is generated from it (``FAULTS_WRITE_DOCS=1`` rewrites it;
otherwise a test checks it is up to date), so the table says what is asserted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass

import pytest

from harness.echo import echo
from harness.procs import ROOT, Proc, list_fds, process_state, run_example, takeover
from harness.waiting import wait_until
from mitm import TO_ORIGINATOR, TO_RECIPIENT, Relay, Trigger
from streaming import streaming
from takeover._protocol import Kind
from test_rollback import check_own_fds, service_fds

pytestmark = pytest.mark.slow

FULL = 50  # clients in the cells after the graph has gone out, where a mistake costs most
LIGHT = 10  # clients everywhere else
DOCS = os.path.join(ROOT, "docs", "faults.md")

ORIGINATOR, RECIPIENT, NONE = "originator", "recipient", "none"
KILL_RECIPIENT, KILL_ORIGINATOR, CUT, CORRUPT = (
    "kill recipient",
    "kill originator",
    "cut channel",
    "corrupt frame",
)
FAULTS = (KILL_RECIPIENT, KILL_ORIGINATOR, CUT, CORRUPT)


@dataclass(frozen=True)
class Step:
    """A row: where in the conversation the fault strikes."""

    name: str
    recipient_point: str | None  # TAKEOVER_FAULTS point in the recipient
    originator_point: str | None  # ... in the originator
    frame: tuple[str, Kind]  # the relay's frame: the next one at this step
    inside: bool = False  # the relay acts inside that frame
    clients: int = LIGHT
    relay: bool = True  # the relay's cells apply (not a repeat of the row above)


STEPS = [
    Step("connected", "recipient.connected", "originator.connected", (TO_ORIGINATOR, Kind.HELLO)),
    Step(
        "authenticated",
        "recipient.authenticated",
        "originator.authenticated",
        (TO_ORIGINATOR, Kind.LIST),
    ),
    Step("listed", "recipient.listed", "originator.listed", (TO_ORIGINATOR, Kind.TAKE)),
    # After TAKE the originator sends the arbiter and the sockets its dry run
    # found (FDS frames), while the service still runs; then it quiesces and
    # sends the graph, then any socket that appeared since (none here).
    Step("take asked", "recipient.take-sent", "originator.take-received", (TO_RECIPIENT, Kind.FDS)),
    # The recipient builds, registers and twins the sockets sent ahead, then
    # says STAGED; only then does the originator pause the service.
    Step(
        "fds sent ahead",
        "recipient.ahead-received",
        "originator.fds-sent-ahead",
        (TO_ORIGINATOR, Kind.STAGED),
    ),
    Step(
        "staged", "recipient.staged-sent", "originator.staged-received", (TO_RECIPIENT, Kind.GRAPH)
    ),
    Step("mid-graph", None, None, (TO_RECIPIENT, Kind.GRAPH), inside=True),
    # After the graph (and any descriptor that follows it) the recipient
    # rebuilds and adopts it, records COMMITTED in the move's arbiter, starts
    # and answers COMMITTED: the next frame is COMMITTED.
    Step(
        "graph sent",
        "recipient.graph-received",
        "originator.graph-sent",
        (TO_ORIGINATOR, Kind.COMMITTED),
        clients=FULL,
    ),
    # The same frames as the row above (no descriptor follows the graph here),
    # so only the kills, at their own points.
    Step(
        "fds sent",
        "recipient.fds-received",
        "originator.fds-sent",
        (TO_ORIGINATOR, Kind.COMMITTED),
        clients=FULL,
        relay=False,
    ),
    # Adopted, not yet committed; the originator is waiting, at no point of its own.
    Step(
        "adopted",
        "recipient.adopted",
        None,
        (TO_ORIGINATOR, Kind.COMMITTED),
        clients=FULL,
        relay=False,
    ),
    Step(
        "committed",
        "recipient.committed-sent",
        "originator.committed-received",
        (TO_ORIGINATOR, Kind.BYE),
    ),
]
STEP = {step.name: step for step in STEPS}

# Who serves the service once the fault has played out. Anything not listed
# here is served by the originator (the move rolled back).
EXPECTED = {
    # The originator dies before the recipient holds the graph: the service
    # dies with it, as it would without any migration going on.
    **{
        (name, KILL_ORIGINATOR): NONE
        for name in (
            "connected",
            "authenticated",
            "listed",
            "take asked",
            "fds sent ahead",
            "staged",
        )
    },
    # The recipient holds the whole graph and its descriptors: nobody has
    # recorded ROLLED_BACK, so it commits and serves, whether or not the
    # originator is alive to read COMMITTED.
    ("graph sent", KILL_ORIGINATOR): RECIPIENT,
    ("fds sent", KILL_ORIGINATOR): RECIPIENT,
    # The relay acts on COMMITTED, which the recipient sends once it has
    # recorded COMMITTED in the arbiter: the originator, finding no intact
    # COMMITTED, asks the arbiter and releases.
    ("graph sent", CUT): RECIPIENT,
    ("graph sent", CORRUPT): RECIPIENT,
    # After COMMITTED the service is the recipient's: killing it kills the service.
    ("committed", KILL_RECIPIENT): NONE,
    ("committed", KILL_ORIGINATOR): RECIPIENT,
    ("committed", CUT): RECIPIENT,
    ("committed", CORRUPT): RECIPIENT,
}

# Cells that fail today, with why (strict xfail: they must fail).
KNOWN_GAPS: dict[tuple[str, str], str] = {
    # None: a channel cut that swallows COMMITTED used to leave both processes
    # serving; the commit arbiter (src/takeover/_arbiter.py) settles it.
}


def applicable(step: Step, fault: str) -> bool:
    if fault == KILL_RECIPIENT:
        return step.recipient_point is not None
    if fault == KILL_ORIGINATOR:
        return step.originator_point is not None
    return step.relay


def expected(step: Step, fault: str) -> str:
    return EXPECTED.get((step.name, fault), ORIGINATOR)


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


# -- helpers -------------------------------------------------------------------


def listener_inode(port: int) -> str:
    """``socket:[N]`` of the socket listening on 127.0.0.1:``port``."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def holders(inode: str, *candidates: Proc) -> list[Proc]:
    """The live processes among ``candidates`` that hold ``inode``."""
    found = []
    for proc in candidates:
        if proc.popen.poll() is not None:
            continue
        try:
            if inode in list_fds(proc.pid).values():
                found.append(proc)
        except FileNotFoundError:
            continue
    return found


def wait_stopped(proc: Proc, point: str) -> None:
    """Wait until ``proc`` has stopped itself at fault point ``point``."""

    def stopped() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(
                f"{proc.argv} exited ({proc.popen.poll()}) before reaching {point}:\n"
                + proc.output()
            )
        return process_state(proc.pid) == "T"

    wait_until(stopped, what=f"a stop at {point}")


def secret_file(workdir: str) -> str:
    path = os.path.join(workdir, "secret")
    with open(path, "w") as f:
        f.write("fault matrix\n")
    os.chmod(path, 0o600)
    return path


@dataclass
class Result:
    server: str
    clients: int
    errors: int
    corrupted: int


def run_cell(
    step: Step,
    fault: str,
    workdir: str,
    control: str,
    port: int,
    procs: list[Proc],
    *,
    tcp: bool = False,
    example: str = "echo",
    take_args: tuple[str, ...] = (),
    waker_fds: int = 0,
    pollers: int | None = None,
) -> Result:
    """Play one cell of the matrix and check its invariants; return what happened.

    With ``tcp``, the control channel is ``tcp:127.0.0.1:PORT`` (descriptors then
    travel on the separate same-host fd transport) and ``control`` is ignored.
    ``example`` is the line echo to run (``twisted_echo`` for the Twisted
    runtime, with ``take_args`` ``--runtime twisted``); a recipient of that
    runtime holds ``waker_fds`` more descriptors of its own (the reactor's pipe).
    An asyncio service has an epoll instance of its own for its connections
    (``pollers``: 1 by default, 0 for the Twisted runtime).
    """
    if pollers is None:
        pollers = 0 if waker_fds else 1
    secret = secret_file(workdir)
    if tcp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            control = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    origin_env = None
    if fault == KILL_ORIGINATOR:
        origin_env = {"TAKEOVER_FAULTS": f"{step.originator_point}=stop"}
    origin = run_example(example, port, control, "--secret-file", secret, env=origin_env)
    procs.append(origin)
    want = expected(step, fault)
    with streaming(port, step.clients) as clients:
        clients.wait_all_echoing()
        inode = listener_inode(port)
        before = list_fds(origin.pid)
        relay = None
        target = control
        if fault in (CUT, CORRUPT):
            target = os.path.join(workdir, "relay.sock")
            action = "cut" if fault == CUT else "corrupt"
            relay = Relay(target, control, Trigger(*step.frame, action, step.inside))
            relay.start()
        recipient_env = None
        if fault == KILL_RECIPIENT:
            recipient_env = {"TAKEOVER_FAULTS": f"{step.recipient_point}=stop"}
        recipient = takeover("take", target, "--secret-file", secret, *take_args, env=recipient_env)
        procs.append(recipient)

        if fault in (KILL_RECIPIENT, KILL_ORIGINATOR):
            victim = recipient if fault == KILL_RECIPIENT else origin
            point = step.recipient_point if fault == KILL_RECIPIENT else step.originator_point
            assert point is not None
            wait_stopped(victim, point)
            victim.signal(signal.SIGKILL)
            assert victim.wait() == -signal.SIGKILL
        if relay is not None:
            relay.stop()
            assert relay.fired.is_set(), f"the relay never saw {step.frame}: {relay.seen}"

        # Let the fault play out: the survivors settle.
        if want == RECIPIENT:
            recipient.expect(r"^serving 1 service\(s\) at ")
            try:
                # It exits at once once it has released its only service.
                assert origin.wait(5) in (0, -signal.SIGKILL), origin.output()
            except subprocess.TimeoutExpired:
                pass  # still running: the check below says what it holds
        else:
            status = recipient.wait()
            if fault != KILL_RECIPIENT:
                assert status == 1, recipient.output()
        if want == NONE and origin.popen.poll() is None:
            assert origin.wait() == 0, origin.output()

        # Never two processes serving one service.
        held = holders(inode, origin, recipient)
        assert [p.pid for p in held] == {
            ORIGINATOR: [origin.pid],
            RECIPIENT: [recipient.pid],
            NONE: [],
        }[want], f"{want} should hold the listener; held by {[p.argv for p in held]}"

        # No descriptor leaked by the survivor.
        if want == ORIGINATOR:
            wait_until(lambda: list_fds(origin.pid) == before, what="the originator's fd table")
        elif want == RECIPIENT:
            moved = service_fds(recipient.pid, port)
            assert len(moved) == 1 + step.clients, moved  # the listener and every connection
            wait_until(
                lambda: len(list_fds(recipient.pid)) == len(moved) + 7 + waker_fds + pollers,
                what="the recipient's fd table to settle",
            )
            own = {fd: t for fd, t in list_fds(recipient.pid).items() if fd not in moved}
            if waker_fds:
                waker = [fd for fd, t in own.items() if t.startswith("pipe:") and t != own[1]]
                assert len(waker) == waker_fds, own
                own = {fd: t for fd, t in own.items() if fd not in waker}
            if not tcp:
                # It took everything: it bound a temporary path and renamed it over CONTROL.
                check_own_fds(recipient.pid, own, f"{target}.{recipient.pid}.tmp", pollers)

        # The survivor serves: the streams go on and a new client is echoed.
        if want != NONE:
            clients.wait_progress()
            if want == ORIGINATOR:
                # Again, now that its loop has turned many times: a control
                # connection it accepted late is gone too.
                wait_until(lambda: list_fds(origin.pid) == before, what="the fd table")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh:
                assert echo(fresh, b"fresh\n") == b"fresh\n"
        outcome = clients.finish()

    # Never a byte lost, duplicated or altered on a stream, even one that was cut.
    assert outcome.corrupted == {}, outcome.corrupted
    assert outcome.incomplete == [], outcome.incomplete
    if want == NONE:
        # The service died with its only holder: every stream was cut.
        assert len(outcome.errors) == step.clients, outcome.errors
    else:
        assert outcome.errors == {}, outcome.errors
        assert outcome.unechoed == 0
    for proc in (origin, recipient):
        proc.signal(signal.SIGTERM)
        proc.wait()
    return Result(want, step.clients, len(outcome.errors), len(outcome.corrupted))


# -- the matrix ------------------------------------------------------------------


@pytest.mark.parametrize(("step", "fault"), CELLS)
def test_fault_matrix(step, fault, workdir, control, free_port, procs):
    """One cell of the fault matrix: the service runs exactly once, clients unharmed."""
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
        "frame with one byte flipped (mid-JSON; for mid-graph, mid-pickle).",
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
