"""A writer outside the service, writing every millisecond while the service moves.

tests/apps/pusher.py (and twisted_pusher.py) feed each connection numbered
lines from a task that is not part of the service. Every process that serves
the service counts, for each connection, the lines whose ``write()`` returned;
the clients count the lines they got from each process, and check that they
are numbered 0, 1, 2... without a gap or a repeat. The two counts must be
equal: a line counted by a writer and never received was silently lost.

A writer that knows nothing of moves makes some of them roll back (it wrote
after the graph was pickled); each such take fails naming the connection and
the writer's line, and is retried. A writer paused through the hooks, as the
documentation shows, never does.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from harness.procs import APPS, PYTHON, Proc, takeover
from latewrites import Feeds

CLIENTS = 20
ATTEMPTS = 60  # takes tried per move before the test gives up
SLOWER_AFTER = 15  # takes rolled back in a row before the writer is asked to halve its rate
ROLLED_BACK = re.compile(
    r"^takeover: error: the originator rolled 'pusher' back before this side could commit "
    r"\(write\(\) on the connection from 127\.0\.0\.1:\d+.*, at (twisted_)?pusher\.py:\d+ "
    r"in push_once, after the graph was pickled: .*Stop such writers in takeover_quiesce\(\)"
)


def _move(
    origin: Proc,
    control: str,
    env: dict[str, str],
    procs: list[Proc],
    take_args: tuple[str, ...],
    feeds: Feeds,
) -> tuple[Proc, list[str]]:
    """Take the service, retrying while a late write rolls the move back."""
    failures = []
    for attempt in range(ATTEMPTS):
        if attempt and attempt % SLOWER_AFTER == 0:
            # A loaded machine (CI) can make nearly every take lose the race with a
            # 1 ms writer: it is still a writer that knows nothing of moves, only slower.
            origin.signal(signal.SIGUSR2)
            origin.expect(r"^pusher interval ")
        recipient = takeover("take", control, *take_args, env=env)
        procs.append(recipient)
        found = recipient.expect(r"^(serving |takeover: error: )")
        feeds.read(0.01)
        if found[1] == "serving ":
            return recipient, failures
        assert recipient.wait() == 1, recipient.output()
        line = next(x for x in recipient.output().splitlines() if x.startswith("takeover: error"))
        assert ROLLED_BACK.search(line), line
        failures.append(line)
    raise AssertionError(f"no take committed in {ATTEMPTS} attempts: {failures[-1]}")


def _run(
    app: str,
    moves: int,
    polite: bool,
    workdir: str,
    control: str,
    port: int,
    procs: list[Proc],
    take_args: tuple[str, ...] = (),
) -> int:
    """Move the service ``moves`` times under a 1 ms writer; check both counts.

    Returns the number of takes that rolled back."""
    stats = os.path.join(workdir, "stats")
    os.mkdir(stats)
    env = {"PUSHER_STATS": stats, "PUSHER_POLITE": "1" if polite else "0"}
    origin = Proc(
        [PYTHON, os.path.join(APPS, app), "--port", str(port), "--control", control], env=env
    )
    procs.append(origin)
    origin.expect("control")
    servers = [origin]
    rollbacks = 0
    with Feeds(port, CLIENTS) as feeds:
        feeds.read(0.2)
        for _ in range(moves):
            recipient, failures = _move(servers[-1], control, env, procs, take_args, feeds)
            rollbacks += len(failures)
            assert servers[-1].wait() == 0, servers[-1].output()
            servers.append(recipient)
            feeds.read(0.01)
        last = servers[-1]
        feeds.read(0.2)
        # SIGTERM: the last server closes every connection (after sending what it
        # holds), and each server has written its counts on the way out.
        last.signal(signal.SIGTERM)
        feeds.read_to_end()
        assert last.wait() == 0, last.output()
        received = feeds.by_client()
    written: dict[str, dict[int, int]] = {client: {} for client in received}
    refused = 0
    for server in servers:
        with open(os.path.join(stats, f"{server.pid}.json")) as f:
            counts = json.load(f)
        refused += counts["moved"]
        for client, count in counts["written"].items():
            written[client][server.pid] = count
    assert set(written) == set(received)
    for client, by_pid in received.items():
        assert dict(by_pid) == written[client], (client, dict(by_pid), written[client])
    # Every server wrote, and no line came from a process that did not serve.
    assert all(written[c].get(s.pid, 0) > 0 for c in written for s in servers)
    print(
        f"{moves} moves, {rollbacks} rolled back by a late write, {refused} writes refused, "
        f"{feeds.received} lines"
    )
    return rollbacks


@pytest.mark.slow
def test_a_writer_outside_the_service_loses_nothing_in_50_moves(workdir, control, free_port, procs):
    """A 1 ms writer that knows nothing of moves: 50 moves, every line it counted arrives once."""
    _run("pusher.py", 50, False, workdir, control, free_port, procs)


@pytest.mark.slow
def test_a_writer_paused_by_the_hooks_never_rolls_a_move_back(workdir, control, free_port, procs):
    """Paused in takeover_quiesce, restarted in takeover_resume/adopted: 20 moves, none retried."""
    assert _run("pusher.py", 20, True, workdir, control, free_port, procs) == 0


@pytest.mark.slow
def test_a_twisted_writer_loses_nothing(workdir, control, free_port, procs):
    """The same 1 ms writer on the Twisted runtime (a LoopingCall): 10 moves, nothing lost."""
    _run(
        "twisted_pusher.py", 10, False, workdir, control, free_port, procs, ("--runtime", "twisted")
    )
