"""The Twisted runtime (takeover.twisted) in real processes.

The 50-stream test runs against examples/twisted_echo.py in test_stream.py;
here: the manhole over a real telnet client (same interpreter, then CPython
3.13), the recipient-killed cells of the fault matrix and its "write during
transit" column, a UNIX port, and Twisted's unsent write buffer carried
across a move.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import sys

import pytest

import pythons
from faultmatrix import (
    FAULTS,
    KILL_RECIPIENT,
    RECIPIENT,
    STEP,
    STEPS,
    WRITE,
    WRITE_OUTCOMES,
    applicable,
    expected,
    run_cell,
    secret_file,
)
from harness.procs import EXAMPLES, ROOT, Proc, run_example, takeover
from harness.waiting import wait_until
from latewrites import run_write_cell

TWISTED = ("--runtime", "twisted")
# A manhole session carries an interpreter that runs the source it is given:
# its recipient allows those modules by name (see examples/twisted_manhole.py).
MANHOLE_ALLOW = (
    "--allow",
    "twisted.conch.manhole",
    "--allow",
    "twisted.python.monkey",
    "--allow",
    "codeop",
)
# Made by `make twisted-interpreters` (a dependency of `make test`).
PYTHON_313 = os.path.join(ROOT, ".venv-3.13", "bin", "python")


def test_the_twisted_extra_is_installed():
    """make test installs the twisted extra: none of these tests may skip for lack of it."""
    import twisted

    # pyproject's pins: Twisted 26.10 needs Python 3.10; 26.4 is the last for 3.9.
    assert twisted.__version__ == ("26.10.0" if sys.version_info >= (3, 10) else "26.4.0")


# -- the manhole over telnet ------------------------------------------------------


def _manhole(port: int, control: str) -> Proc:
    return run_example("twisted_manhole", port, control, "--user", "alice:s3cret")


def _prompt(client) -> None:  # type: ignore[no-untyped-def]
    client.expect(">>> ")


def _login(client) -> None:  # type: ignore[no-untyped-def]
    client.expect("Username: ")
    client.sendline("alice")
    client.expect("Password: ")
    client.sendline("s3cret")
    _prompt(client)
    client.sendline("import os")
    _prompt(client)


def _evaluate(client, source: str, pattern: str) -> re.Match[str]:  # type: ignore[no-untyped-def]
    """Type ``source`` and Enter; the answer must match ``pattern``."""
    client.sendline(source)
    client.expect(pattern)
    match = client.match
    _prompt(client)
    return match  # type: ignore[no-any-return]


def _move(control: str, python: str, procs: list[Proc]) -> Proc:
    recipient = takeover("take", control, *TWISTED, *MANHOLE_ALLOW, python=python)
    procs.append(recipient)
    recipient.expect(r"^took manhole: 1 connections")
    recipient.expect(r"^serving 1 service\(s\) at " + re.escape(control) + " ")
    return recipient


def _need_telnet() -> None:
    """Skip on a developer's machine; fail in CI, where `make interpreters` installs it."""
    if shutil.which("telnet") is None:
        pythons.missing("telnet", "run `make interpreters`")


def test_manhole_session_moves_to_this_interpreter_and_to_cpython_313(control, free_port, procs):
    """A telnet client logged into the manhole keeps its namespace, its half-typed
    line and its terminal across two moves: a new process, then CPython 3.13."""
    _need_telnet()
    import pexpect

    assert os.access(PYTHON_313, os.X_OK), (
        f"{PYTHON_313} is missing: run `make twisted-interpreters` (part of `make test`)"
    )
    origin = _manhole(free_port, control)
    procs.append(origin)
    client = pexpect.spawn("telnet", ["127.0.0.1", str(free_port)], encoding="utf-8", timeout=15)
    try:
        client.expect("Username: ")
        client.sendline("alice")
        client.expect("Password: ")
        client.sendline("s3cret")
        _prompt(client)
        _evaluate(client, "answer = 6 * 7", ">>> ")
        client.sendline("import json, os, sys")
        _prompt(client)
        first = int(_evaluate(client, "os.getpid()", r"(\d+)\r*\n").group(1))
        assert first == origin.pid

        # 1. To a new process on this interpreter, with a line half typed.
        client.send("half = ans")
        # The manhole echoes what it has read: "ans" whole once it has the last key.
        client.expect_exact("ans")
        second_proc = _move(control, sys.executable, procs)
        assert origin.wait() == 0, origin.output()
        client.sendline("wer + 1")
        _prompt(client)
        match = _evaluate(
            client, "half, json.dumps({'a': answer}), os.getpid()", r"\(43, '(.*?)', (\d+)\)"
        )
        assert match.group(1) == '{"a": 42}'
        second = int(match.group(2))
        assert second == second_proc.pid != first

        # 2. To CPython 3.13, in the middle of a session that defines more.
        _evaluate(client, "squares = [n * n for n in range(5)]", ">>> ")
        third_proc = _move(control, PYTHON_313, procs)
        assert second_proc.wait() == 0, second_proc.output()
        match = _evaluate(
            client,
            "answer, half, squares, os.getpid(), sys.version_info[:2]",
            r"\(42, 43, \[0, 1, 4, 9, 16\], (\d+), \((\d+), (\d+)\)\)",
        )
        third = int(match.group(1))
        assert third == third_proc.pid and third not in (first, second)
        assert (int(match.group(2)), int(match.group(3))) == (3, 13)
        # The module imported before the moves is still the session's `os`.
        _evaluate(client, "os.getpid() == " + str(third), r"True")

        # A second login is served by the 3.13 process too.
        other = pexpect.spawn("telnet", ["127.0.0.1", str(free_port)], encoding="utf-8", timeout=15)
        try:
            other.expect("Username: ")
            other.sendline("alice")
            other.expect("Password: ")
            other.sendline("s3cret")
            _prompt(other)
            _evaluate(other, "'answer' in dir()", "False")
        finally:
            other.close(force=True)
    finally:
        client.close(force=True)
    third_proc.signal(signal.SIGTERM)
    assert third_proc.wait() == 0, third_proc.output()


def test_a_default_recipient_refuses_a_logged_in_manhole(control, free_port, procs):
    """Without --allow twisted.conch.manhole (an interpreter that runs what it is
    given), the graph is refused by name and the session goes on in its process."""
    _need_telnet()
    import pexpect

    origin = _manhole(free_port, control)
    procs.append(origin)
    client = pexpect.spawn("telnet", ["127.0.0.1", str(free_port)], encoding="utf-8", timeout=15)
    try:
        _login(client)
        _evaluate(client, "kept = 'here'", ">>> ")
        recipient = takeover("take", control, *TWISTED)
        procs.append(recipient)
        assert recipient.wait() == 1
        assert "refused twisted." in recipient.output(), recipient.output()
        match = _evaluate(client, "kept, os.getpid()", r"\('here', (\d+)\)")
        assert int(match.group(1)) == origin.pid
    finally:
        client.close(force=True)
    assert origin.popen.poll() is None


# -- the fault matrix: every recipient-killed cell, and those the recipient wins ------

# Every cell where the recipient is SIGKILLed, and every cell whose outcome is
# the recipient serving (the originator killed after the descriptors went out,
# the channel cut or garbled as COMMITTED passes): the Twisted recipient's
# commit through the arbiter. The rest of the matrix exercises the originator's side, the
# same asyncio channel code as tests/test_faults.py.
TWISTED_CELLS = [
    pytest.param(step.name, fault, id=f"{step.name.replace(' ', '-')}:{fault.replace(' ', '-')}")
    for step in STEPS
    for fault in FAULTS
    if fault != WRITE
    and applicable(step, fault)
    and (fault == KILL_RECIPIENT or expected(step, fault) == RECIPIENT)
]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "fault"), TWISTED_CELLS)
def test_fault_matrix_twisted(step, fault, workdir, control, free_port, procs):
    """The fault matrix's cells for examples/twisted_echo.py and Twisted recipients:
    the service runs exactly once, no stream loses, duplicates or alters a byte."""
    result = run_cell(
        STEP[step],
        fault,
        workdir,
        control,
        free_port,
        procs,
        example="twisted_echo",
        take_args=TWISTED,
        waker_fds=2,
    )
    assert result.server == expected(STEP[step], fault)


@pytest.mark.slow
@pytest.mark.parametrize(
    "step",
    [step.name for step in STEPS if applicable(step, WRITE)],
    ids=lambda name: name.replace(" ", "-"),
)
def test_fault_matrix_twisted_write_during_transit(step, workdir, control, free_port, procs):
    """The "write during transit" column with a Twisted writer and service
    (tests/apps/twisted_pusher.py) and Twisted recipients: every line written
    while the recipient is stopped at the step goes out (before the pause, or
    after the rollback it causes) or is refused at the writer."""
    row = STEP[step]
    assert row.recipient_point is not None
    run_write_cell(
        step,
        row.recipient_point,
        WRITE_OUTCOMES[step][1],
        row.clients,
        secret_file(workdir),
        control,
        free_port,
        procs,
        app="twisted_pusher.py",
        take_args=TWISTED,
    )


# -- a UNIX port, and the unsent write buffer ----------------------------------------


def test_unix_port_and_its_connection_move(workdir, control, procs):
    """listen_unix: the AF_UNIX listener and a connection with half a line move."""
    path = os.path.join(workdir, "echo.sock")
    origin = Proc(
        [
            sys.executable,
            os.path.join(EXAMPLES, "twisted_echo.py"),
            *("--unix", path, "--control", control),
        ]
    )
    procs.append(origin)
    origin.expect("control")
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(b"one\ntw")
        assert client.recv(100) == b"one\n"
        recipient = takeover("take", control, *TWISTED)
        procs.append(recipient)
        recipient.expect(r"^took echo: 1 connections")
        recipient.expect(r"^serving 1 service\(s\)")
        assert origin.wait() == 0, origin.output()
        client.sendall(b"o\n")
        assert client.recv(100) == b"two\n"
        with socket.socket(socket.AF_UNIX) as fresh:
            fresh.settimeout(10)
            fresh.connect(path)
            fresh.sendall(b"fresh\n")
            assert fresh.recv(100) == b"fresh\n"
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """(sent and not acknowledged, received and not read) bytes of the TCP socket
    from 127.0.0.1:``local_port`` to ``remote_port``, from /proc/net/tcp."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            ports = tuple(int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
            if ports == (local_port, remote_port):
                tx, rx = (int(n, 16) for n in fields[4].split(":"))
                return tx, rx
    raise AssertionError(f"no TCP socket from port {local_port} to {remote_port}")


def test_unsent_output_in_twisteds_write_buffer_moves(control, free_port, procs):
    """A client that stops reading leaves megabytes in the transport's buffer
    (dataBuffer/_tempDataBuffer); they travel and arrive, in order, from the
    new process."""
    origin = run_example("twisted_echo", free_port, control)
    procs.append(origin)
    line = b"0123456789abcdef" * 63 + b"\n"  # 1 KiB
    total = 24 * 1024 * 1024
    sent = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        chunk = line * 64
        written = 0
        # Write without reading until the kernel buffers on both sides are full
        # and the echo's output piles up in Twisted's user-space buffer (the
        # echo reads on regardless: it registers no producer).
        while written < total:
            client.sendall(chunk)
            sent.update(chunk)
            written += len(chunk)
        assert written >= total
        # The originator reads on: wait until it has read every byte sent (none
        # unacknowledged on the client's side, none unread on its own), so that
        # what it echoed and could not write is in Twisted's buffer, not the kernel's.
        here, there = client.getsockname()[1], free_port
        wait_until(
            lambda: _tcp_queues(here, there)[0] == 0 and _tcp_queues(there, here)[1] == 0,
            what="the originator to read all that was sent",
        )
        recipient = takeover("take", control, *TWISTED, "--json")
        procs.append(recipient)
        match = recipient.expect(r'^\{"connections": 1, "event": "taken", .*"graph_bytes": (\d+)')
        # Most of what was echoed had not left the originator: it moved in the graph.
        assert int(match.group(1)) > 4 * 1024 * 1024, match.group(0)
        assert origin.wait() == 0, origin.output()
        client.settimeout(20)
        client.shutdown(socket.SHUT_WR)
        received = hashlib.sha256()
        count = 0
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            received.update(chunk)
            count += len(chunk)
        assert count == written
        assert received.hexdigest() == sent.hexdigest()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()


def test_policy_allows_interfaces_only_of_allowed_modules():
    """A zope.interface declaration is named like a class: allowed where its module is."""
    from twisted.cred import credentials

    from takeover._core.errors import MigrationRefusedError
    from takeover._core.policy import UnpicklePolicy
    from takeover.twisted import GRAPH_MODULES

    interface = credentials.IUsernamePassword
    UnpicklePolicy(GRAPH_MODULES).check_global(
        "twisted.cred.credentials", "IUsernamePassword", interface
    )
    with pytest.raises(MigrationRefusedError, match="IUsernamePassword"):
        UnpicklePolicy().check_global("twisted.cred.credentials", "IUsernamePassword", interface)


def test_the_api_takes_in_an_applications_own_reactor(control, free_port, procs):
    """takeover.twisted.take and serve_until_moved in a program's own reactor:
    it takes the echo with a live connection, serves it, and hands it on."""
    origin = run_example("twisted_echo", free_port, control)
    procs.append(origin)
    app = os.path.join(ROOT, "tests", "apps", "twisted_recipient.py")
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        client.sendall(b"one\ntw")
        assert client.recv(100) == b"one\n"
        recipient = Proc([sys.executable, app, "--control", control])
        procs.append(recipient)
        pid = int(recipient.expect(r"^took echo 1 pid (\d+)").group(1))
        recipient.expect(r"^serving at ")
        assert origin.wait() == 0, origin.output()
        client.sendall(b"o\n")
        assert client.recv(100) == b"two\n"
        # And on again, to the generic recipient.
        last = takeover("take", control, *TWISTED)
        procs.append(last)
        last.expect(r"^took echo: 1 connections")
        assert recipient.wait() == 0, recipient.output()
        client.sendall(b"three\n")
        assert client.recv(100) == b"three\n"
        assert pid != last.pid
    last.signal(signal.SIGTERM)
    assert last.wait() == 0, last.output()
