"""Without an anchor: the server tells its supervisor who serves next.

The PID file follows the service from process to process, replaced
atomically; under ``$NOTIFY_SOCKET`` the old server hands ``MAINPID=`` to its
successor (and waits for the barrier before it exits); ``takeover take
--detach`` returns once the successor serves, as ``ExecReload=`` needs. A
notification socket of the test's own stands in for systemd's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from harness.echo import echo
from harness.procs import APPS, PYTHON, Proc, process_state, run_example, takeover
from harness.waiting import wait_until
from test_anchor import Upstream


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def test_the_pid_file_follows_the_service(workdir, control, free_port, procs):
    """Each server in turn is named by the PID file, and no temporary file is left."""
    pid_file = os.path.join(workdir, "echo.pid")
    origin = run_example("echo", free_port, control, "--pid-file", pid_file)
    procs.append(origin)
    assert read_pid(pid_file) == origin.pid
    previous: Proc = origin
    for _ in range(2):
        recipient = takeover("take", control)
        procs.append(recipient)
        recipient.expect(r"^serving ")
        assert previous.wait() == 0
        # The recipient was not told --pid-file: the originator handed it on.
        assert read_pid(pid_file) == recipient.pid
        previous = recipient
    assert [name for name in os.listdir(workdir) if name.endswith(".tmp")] == []
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"hello\n") == b"hello\n"
    previous.signal(signal.SIGTERM)
    assert previous.wait() == 0


def test_a_detached_take_returns_and_the_old_server_hands_over_mainpid(
    workdir, control, free_port, procs
):
    """`take --detach` exits 0 once the successor serves; the old server says MAINPID= it."""
    upstream = Upstream(os.path.join(workdir, "notify.sock"))
    try:
        env = {"NOTIFY_SOCKET": upstream.path}
        origin = run_example("echo", free_port, control, env=env)
        procs.append(origin)
        ready = upstream.expect("READY", "1")
        assert ready["STATUS"].startswith("serving 1 service(s), 0 connection(s)")
        assert ready["X_TAKEOVER_SERVICES"] == "1"
        with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
            assert echo(client, b"before\n") == b"before\n"
            reload = takeover("take", "--detach", control, env=env)
            procs.append(reload)
            # (Its output pipe stays open: the successor it left serving writes to it.)
            assert reload.popen.wait(20) == 0, reload.output()
            handed = upstream.expect("MAINPID")
            successor = int(handed["MAINPID"])
            assert successor not in (origin.pid, reload.pid)
            assert handed["READY"] == "1" and handed["STATUS"] == f"moved to pid {successor}"
            # The old server waits for the barrier: reading it here discards
            # its descriptor, as systemd closes it once it has read MAINPID.
            upstream.expect("BARRIER", "1")
            assert origin.wait(5) == 0, origin.output()
            assert echo(client, b"after\n") == b"after\n"
            assert os.path.exists(f"/proc/{successor}")
        os.kill(successor, signal.SIGTERM)
        # Not our child: gone, or a zombie until its new parent reaps it.
        wait_until(lambda: _gone(successor), what="the successor to exit")
    finally:
        upstream.close()


def _gone(pid: int) -> bool:
    try:
        return process_state(pid) == "Z"
    except FileNotFoundError:
        return True


def test_a_detached_take_that_fails_returns_non_zero(workdir, control, free_port, procs):
    origin = run_example("echo", free_port, control)
    procs.append(origin)
    failing = takeover("take", "--detach", control, "--service", "nope")
    procs.append(failing)
    assert failing.wait() == 1
    assert "no service named 'nope'" in failing.output()
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"still\n") == b"still\n"


def ask(client: socket.socket, line: bytes) -> bytes:
    client.sendall(line)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = client.recv(100)
        assert chunk, "closed"
        answer += chunk
    return answer


def test_every_move_is_logged_once_on_each_side(control, free_port, procs):
    """A move that commits and one that fails: one line each, on both sides; JSON when asked."""
    origin = Proc(
        [PYTHON, os.path.join(APPS, "fragile.py"), "--port", str(free_port), "--control", control]
    )
    procs.append(origin)
    origin.expect("control")
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert ask(client, b"lock\n") == b"ok lock\n"
        # The originator refuses: the protocol holds a lock.
        refused = takeover("take", "--log-format", "json", control)
        procs.append(refused)
        assert refused.wait() == 1
        events = [json.loads(line) for line in refused.output().splitlines() if line[:1] == "{"]
        assert [e["event"] for e in events] == ["not-taken"], refused.output()
        (event,) = events
        assert event["service"] == "fragile" and event["peer_pid"] == origin.pid
        assert event["level"] == "warning" and "_thread.lock" in event["reason"]
        line = origin.expect(r"takeover\.moves: did not move 'fragile' to pid (\d+) ")
        assert int(line[1]) == refused.pid and "(nothing was paused)" in line.string
        assert ask(client, b"drop\n") == b"ok drop\n"
        taker = takeover("take", "--log-format", "json", control)
        procs.append(taker)
        took = taker.event("took")
        assert took["service"] == "fragile" and took["peer_pid"] == origin.pid
        assert took["connections"] == 1 and took["pause_ms"] > 0
        moved = origin.expect(r"takeover\.moves: moved 'fragile' to pid (\d+): 1 connections, ")
        assert int(moved[1]) == taker.pid
        assert re.search(r"paused \d+\.\d\d ms$", moved.string), moved.string
        assert origin.wait() == 0
        assert echo(client, b"after\n") == b"after\n"
    # In text, `take` prints its own line for each move: no second one from its log.
    assert "takeover.moves" not in "".join(
        line for line in taker.output().splitlines() if not line.startswith("{")
    )
    taker.signal(signal.SIGTERM)
    assert taker.wait() == 0
