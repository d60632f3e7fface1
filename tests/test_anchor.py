"""``takeover run``: the anchor whose PID never changes, in real processes.

A notification socket of the test's own stands in for systemd's (the
datagrams are the same: systemd itself is in tests/test_systemd.py), 50
clients stream checksummed data through examples/echo.py while SIGHUPs move
it, and the anchor also runs as PID 1 of a PID namespace, as in a container.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time

import pytest

import pythons
from harness.echo import echo
from harness.procs import EXAMPLES, PYTHON, Proc
from harness.waiting import wait_until
from services import holders, listener_inode
from streaming import streaming

CLIENTS = 50
MOVES = 5


class Upstream:
    """A supervisor's notification socket: what the anchor tells systemd."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def expect(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        """The next message that sets ``key`` (to ``value``); earlier ones are kept."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {key}={value or '*'} from the anchor: {self.messages}"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message


def serving_pid(message: dict[str, str]) -> int:
    found = re.match(r"serving pid (\d+): ", message["STATUS"])
    assert found, message
    return int(found[1])


def anchor_argv(control: str, port: int, *extra: str) -> list[str]:
    echo_py = os.path.join(EXAMPLES, "echo.py")
    server = [PYTHON, echo_py, "--port", str(port), "--control", control]
    return [PYTHON, "-m", "takeover", "run", "--control", control, *extra, "--", *server]


@pytest.fixture
def upstream(workdir: str):
    notify = Upstream(os.path.join(workdir, "notify.sock"))
    yield notify
    notify.close()


@pytest.mark.slow
def test_sighup_moves_the_service_and_the_anchor_tells_systemd(upstream, control, free_port, procs):
    """Five SIGHUPs: five moves under 50 streams, RELOADING then READY each time, one anchor PID."""
    anchor = Proc(anchor_argv(control, free_port), env={"NOTIFY_SOCKET": upstream.path})
    procs.append(anchor)
    first = upstream.expect("READY", "1")
    assert serving_pid(first) != anchor.pid
    assert "1 service(s)" in first["STATUS"]
    servers = [serving_pid(first)]
    with streaming(free_port, CLIENTS) as clients:
        clients.wait_all_echoing()
        inode = listener_inode(free_port)
        for move in range(1, MOVES + 1):
            anchor.signal(signal.SIGHUP)
            reloading = upstream.expect("RELOADING", "1")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            ready = upstream.expect("READY", "1")
            assert f"{move} move(s)" in ready["STATUS"], ready
            new = serving_pid(ready)
            assert new not in servers
            servers.append(new)
            # The new server holds the listener; the old one has exited and been reaped.
            assert holders(inode, anchor) == []
            wait_until(lambda: _holds(servers[-1], inode), what="the new server's listener")
            wait_until(lambda: not os.path.exists(f"/proc/{servers[-2]}"), what="the old server")
            clients.wait_progress()
        # The status line names the last pause, once the new server has said it.
        if "last pause" not in ready["STATUS"]:
            ready = upstream.expect("STATUS", timeout=5)
        assert re.search(r"; last pause \d+\.\d+ ms$", ready["STATUS"]), ready
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {} and outcome.incomplete == []
    assert anchor.popen.poll() is None
    anchor.signal(signal.SIGTERM)
    assert anchor.wait() == 0, anchor.output()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in servers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", free_port), timeout=5).close()


def _holds(pid: int, inode: str) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == inode for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


@pytest.mark.slow
def test_a_failed_move_leaves_the_old_server_serving_and_says_why(
    upstream, workdir, control, free_port, procs
):
    """A successor that dies mid-move: READY again, the error in STATUS, then a move works."""
    failing = f"env TAKEOVER_FAULTS=recipient.adopted=exit {PYTHON} -m takeover take {control}"
    failing_anchor = anchor_argv(control, free_port, "--successor", failing)
    anchor = Proc(failing_anchor, env={"NOTIFY_SOCKET": upstream.path})
    procs.append(anchor)
    first = serving_pid(upstream.expect("READY", "1"))
    anchor.signal(signal.SIGHUP)
    upstream.expect("RELOADING", "1")
    ready = upstream.expect("READY", "1")
    assert serving_pid(ready) == first
    assert "0 move(s); last move failed: pid " in ready["STATUS"], ready
    assert "the successor exited with status 99" in ready["STATUS"], ready
    # (Printed about when READY is sent, before or after it: waited for, not looked up.)
    anchor.expect(rf"the move failed, pid {first} goes on serving")
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"still here\n") == b"still here\n"
    # examples/echo.py dies of the SIGTERM passed on to it: so does the anchor.
    anchor.signal(signal.SIGTERM)
    assert anchor.wait() == -signal.SIGTERM, anchor.output()


@pytest.mark.slow
def test_as_pid_1_of_a_container(control, free_port, procs):
    """PID 1 of a PID namespace: five SIGHUPs move the service, SIGTERM ends all with 0."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        # CI runs as root with util-linux: there this fails instead.
        pythons.skip_or_fail("a PID namespace needs root and unshare(1)")
    argv = ["unshare", "--pid", "--fork", "--mount-proc", *anchor_argv(control, free_port)]
    container = Proc(argv)
    procs.append(container)
    container.expect(r"pid \d+ serves")
    # The anchor: unshare's child, PID 1 inside.
    with open(f"/proc/{container.pid}/task/{container.pid}/children") as f:
        init = int(f.read().split()[0])
    with open(f"/proc/{init}/status") as f:
        assert f"NSpid:\t{init}\t1\n" in f.read()
    with streaming(free_port, 10) as clients:
        clients.wait_all_echoing()
        for move in range(1, MOVES + 1):
            os.kill(init, signal.SIGHUP)
            container.expect(rf"the services moved to pid \d+ \(move {move}\)")
            clients.wait_progress()
            # No zombie below the anchor: each old server was reaped.
            wait_until(lambda: _zombies(init) == [], what="no zombie under the anchor")
        outcome = clients.finish()
    assert outcome.errors == {} and outcome.corrupted == {}
    os.kill(init, signal.SIGTERM)
    assert container.wait() == 0, container.output()
    assert not os.path.exists(f"/proc/{init}")


def _zombies(init: int) -> list[int]:
    """Zombie processes among the descendants of ``init``."""
    found, todo = [], [init]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            found.append(pid)
        todo.extend(children)
    return found
