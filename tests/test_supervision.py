"""Without an anchor: the server tells its supervisor who serves next.

The PID file follows the service from process to process, replaced
atomically; under ``$NOTIFY_SOCKET`` the old server hands ``MAINPID=`` to its
successor (and waits for the barrier before it exits); ``takeover take
--detach`` returns once the successor serves, as ``ExecReload=`` needs. A
notification socket of the test's own stands in for systemd's.
"""

from __future__ import annotations

import os
import signal
import socket

from harness.echo import echo
from harness.procs import Proc, process_state, run_example, takeover
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
