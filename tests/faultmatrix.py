"""The fault matrix: its rows, its columns, what each cell expects, and how a cell is played.

For each step of the conversation (a row of docs/faults.md) and each fault (a
column): SIGKILL the recipient there, SIGKILL the originator there, cut the
control channel there, or corrupt the next frame there (the last two with the
man-in-the-middle relay of tests/mitm.py), or, while the recipient is stopped
there, write to every connection from outside the service.
:func:`run_cell` plays one cell of the first four columns with real processes
while clients stream checksummed data through the whole attempt, and checks
its invariants; tests/latewrites.py plays the last column. tests/test_faults.py runs every cell for
the asyncio runtime and renders docs/faults.md from :data:`STEPS`,
:data:`EXPECTED` and :data:`KNOWN_GAPS`; tests/test_twisted.py runs the cells
the Twisted recipient decides.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import dataclass

from harness.echo import echo
from harness.procs import Proc, list_fds, process_state, run_example, takeover
from harness.waiting import wait_until
from mitm import TO_ORIGINATOR, TO_RECIPIENT, Relay, Trigger
from services import check_own_fds, holders, listener_inode, service_fds
from streaming import streaming
from takeover._core.protocol import Kind

FULL = 50  # clients in the cells after the graph has gone out, where a mistake costs most
LIGHT = 10  # clients everywhere else

ORIGINATOR, RECIPIENT, NONE = "originator", "recipient", "none"
KILL_RECIPIENT, KILL_ORIGINATOR, CUT, CORRUPT, WRITE = (
    "kill recipient",
    "kill originator",
    "cut channel",
    "corrupt frame",
    "write during transit",
)
FAULTS = (KILL_RECIPIENT, KILL_ORIGINATOR, CUT, CORRUPT, WRITE)

# What becomes of lines written from outside the service while the recipient
# is stopped at a step (the WRITE column).
SENT = "sent"  # the service was not paused yet: they went out, and the move went on
ROLLED_BACK = "rolled back"  # in transit: the move rolled back, they went out from here
TOLD = "told"  # the recipient had committed: write() raised, or is_closing() said so


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
    # says AHEAD_READY; only then does the originator pause the service.
    Step(
        "fds sent ahead",
        "recipient.ahead-received",
        "originator.fds-sent-ahead",
        (TO_ORIGINATOR, Kind.AHEAD_READY),
    ),
    Step(
        "ahead ready",
        "recipient.ahead-ready-sent",
        "originator.ahead-ready-received",
        (TO_RECIPIENT, Kind.GRAPH),
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
    # Committed in the arbiter and started, COMMITTED not yet sent: the
    # originator, still waiting, holds its (quiesced) copies.
    Step(
        "started",
        "recipient.started",
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
            "ahead ready",
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
    # Once committed in the arbiter the service is the recipient's: killing it
    # kills the service.
    ("started", KILL_RECIPIENT): NONE,
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


# The WRITE column: who serves afterwards, and what became of the lines.
WRITE_OUTCOMES = {
    **{
        name: (RECIPIENT, SENT)
        for name in ("connected", "authenticated", "listed", "take asked", "fds sent ahead")
    },
    # AHEAD_READY has gone out: the originator has paused and pickled the service.
    **{
        name: (ORIGINATOR, ROLLED_BACK)
        for name in ("ahead ready", "graph sent", "fds sent", "adopted")
    },
    "started": (RECIPIENT, TOLD),
    "committed": (RECIPIENT, TOLD),
}


def applicable(step: Step, fault: str) -> bool:
    if fault in (KILL_RECIPIENT, WRITE):
        return step.recipient_point is not None
    if fault == KILL_ORIGINATOR:
        return step.originator_point is not None
    return step.relay


def expected(step: Step, fault: str) -> str:
    if fault == WRITE:
        return WRITE_OUTCOMES[step.name][0]
    return EXPECTED.get((step.name, fault), ORIGINATOR)


# -- playing a cell ------------------------------------------------------------


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
        else:
            # Every stream notices the death before it is told to finish: on a
            # loaded machine the driver may lag, and a stream with nothing in
            # flight would otherwise shut down cleanly and read a plain EOF.
            wait_until(
                lambda: all(s.error is not None or s.eof for s in clients.streams),
                what="every stream to see the service die",
            )
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
