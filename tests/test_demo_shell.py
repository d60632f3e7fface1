"""The paper's demonstration: a telnet Python shell moved mid-session.

These drive the real ``telnet`` client through pexpect against ``takeover
demo serve``, and move the server with ``takeover take`` run under other
interpreters, found by ``scripts/find-python`` and checked against the
demo's own search. ``make test`` installs ``telnet`` and ``pypy3`` first
(``make interpreters``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pexpect
import pytest

import pythons
from harness.procs import PYTHON, Proc
from takeover.demo import interpreters
from takeover.demo.interpreters import Interpreter

PASSWORD = "Zq8-v3-hush"
PROMPT = r"(>>>|\.\.\.) $"


@pytest.fixture(scope="module")
def found() -> list[Interpreter]:
    return interpreters.find()


def _interpreter(spec: str) -> Interpreter:
    """``spec`` as scripts/find-python finds it (the tests' own search, not the demo's)."""
    path = pythons.require(spec)
    asked = interpreters.probe([path])
    assert asked, f"{path} cannot run takeover"
    return asked[0]


def _is_this(interpreter: Interpreter) -> bool:
    """Whether ``interpreter`` is the one running the tests (same implementation and 3.N)."""
    this = (sys.implementation.name, sys.version_info[:2])
    return (interpreter.implementation, interpreter.version[:2]) == this


@pytest.fixture
def cpython313() -> Interpreter:
    return _interpreter("3.13")


@pytest.fixture
def pypy() -> Interpreter:
    return _interpreter("pypy3")


@pytest.fixture(autouse=True)
def telnet() -> str:
    path = shutil.which("telnet")
    if path is None:
        pythons.missing("telnet", "run `make interpreters`")
    assert path is not None
    return path


class Session:
    """A user at the real ``telnet`` client."""

    def __init__(self, telnet: str, port: int, user: str, password: str) -> None:
        self.log = io.StringIO()
        self.child = pexpect.spawn(
            telnet, ["127.0.0.1", str(port)], encoding="utf-8", timeout=20, env=os.environ.copy()
        )
        self.child.logfile_read = self.log
        self.child.expect("username: ")
        self.child.sendline(user)
        self.child.expect("password: ")
        self.child.sendline(password)
        self.child.expect(">>> ")

    def type(self, line: str) -> str:
        """Type one line; return what was printed before the next prompt."""
        self.child.sendline(line)
        self.child.expect(PROMPT)
        before = str(self.child.before).replace("\r\n", "\n")
        echoed, _, output = before.partition("\n")
        assert echoed.rstrip() == line.rstrip(), before
        return output.rstrip("\n")

    def block(self, *lines: str) -> str:
        """Type a block and the empty line that ends it; return its output."""
        for line in lines:
            assert self.type(line) == ""
        return self.type("")

    def value(self, expression: str) -> str:
        return self.type(expression)

    @property
    def prompt(self) -> str:
        return str(self.child.after)

    def transcript(self) -> str:
        return self.log.getvalue()

    def close(self) -> None:
        self.child.close(force=True)


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    opened: list[Session] = []
    yield opened
    for session in opened:
        session.close()


def serve(port: int, control: str, *users: str) -> Proc:
    argv = [PYTHON, "-m", "takeover", "demo", "serve", "--port", str(port), "--control", control]
    for user in users:
        argv += ["--user", user]
    proc = Proc(argv)
    proc.expect("move it with")
    return proc


def move(python: str, control: str, old: Proc, procs: list[Proc]) -> Proc:
    """``takeover take`` under ``python``; returns it once the old server has exited."""
    recipient = Proc(
        [python, "-m", "takeover", "take", "--allow", "takeover.demo", control],
        env=interpreters.environment(),
    )
    procs.append(recipient)
    recipient.expect(r"^serving ")
    assert old.wait(20) == 0, old.output()
    return recipient


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_telnet_session_moves_to_cpython_313_and_pypy(
    telnet, free_port, control, procs, sessions, cpython313, pypy
):
    """The paper's transcript, twice: each move gives a new pid and interpreter, nothing lost.

    Run on CPython 3.13 or on PyPy, it moves to the other one only."""
    server = serve(free_port, control, f"admin:{PASSWORD}")
    procs.append(server)
    me = Session(telnet, free_port, "admin", PASSWORD)
    sessions.append(me)
    assert me.type("import sys, os") == ""
    assert me.type("x = 42") == ""
    assert me.block("def double(n):", "    return 2 * n") == ""
    assert me.value("double(21)") == "42"
    assert me.value("os.getpid()") == str(server.pid)
    versions = [me.value("sys.version")]
    assert versions[0] == repr(sys.version)

    previous = server
    targets = [(cpython313, "3.13."), (pypy, "PyPy")]
    for target, marker in [(t, m) for t, m in targets if not _is_this(t)]:
        recipient = move(target.path, control, previous, procs)
        assert_gone(previous.pid)
        assert me.value("os.getpid()") == str(recipient.pid)
        assert (
            me.block(
                "try:",
                f"    os.kill({previous.pid}, 0)",
                "except OSError as e:",
                "    print(e)",
                "else:",
                "    print('No exception occurred')",
            )
            == "[Errno 3] No such process"
        )
        version = me.value("sys.version")
        assert marker in version and version not in versions
        versions.append(version)
        assert me.value("x") == "42"
        assert me.value("double(21)") == "42"
        assert me.value("sys.implementation.name") == repr(target.implementation)
        assert me.value("os.path.basename('/a/b')") == "'b'"
        previous = recipient

    assert PASSWORD not in me.transcript()
    assert "password: " in me.transcript()


def test_a_block_typed_halfway_completes_after_the_move_and_runs_once(
    telnet, free_port, control, procs, sessions
):
    """The lines of a ``for`` block typed before a move and after it run as one block, once."""
    server = serve(free_port, control, f"admin:{PASSWORD}")
    procs.append(server)
    me = Session(telnet, free_port, "admin", PASSWORD)
    sessions.append(me)
    assert me.type("runs = []") == ""
    assert me.type("for i in range(3):") == ""
    assert me.prompt == "... "
    assert me.type("    runs.append(i)") == ""
    recipient = move(PYTHON, control, server, procs)
    assert me.type("    print('ran', i)") == ""
    assert me.prompt == "... "
    assert me.type("") == "ran 0\nran 1\nran 2"
    assert me.prompt == ">>> "
    assert me.value("runs") == "[0, 1, 2]"
    assert me.type("import os") == ""
    assert me.value("os.getpid()") == str(recipient.pid)
    assert me.transcript().count("ran 0") == 1


def test_two_users_keep_their_own_namespaces_across_a_move(
    telnet, free_port, control, procs, sessions
):
    """Two logged-in users during a move keep their own namespaces; a login halfway goes on."""
    server = serve(free_port, control, "alice:apw-1", "bob:bpw-2")
    procs.append(server)
    alice = Session(telnet, free_port, "alice", "apw-1")
    bob = Session(telnet, free_port, "bob", "bpw-2")
    sessions += [alice, bob]
    assert alice.type("x = 'alice'") == ""
    assert bob.type("x = 'bob'") == ""
    assert bob.block("def who():", "    return 'bob says ' + x") == ""
    # A third connection is halfway through logging in: its login state moves too.
    late = pexpect.spawn(telnet, ["127.0.0.1", str(free_port)], encoding="utf-8", timeout=20)
    try:
        late.expect("username: ")
        late.sendline("alice")
        late.expect("password: ")
        move(PYTHON, control, server, procs)
        late.sendline("apw-1")
        late.expect(">>> ")
        late.sendline("'x' in dir()")
        late.expect("False")
    finally:
        late.close(force=True)
    assert alice.value("x") == "'alice'"
    assert bob.value("x") == "'bob'"
    assert bob.value("who()") == "'bob says bob'"
    assert alice.value("'who' in dir()") == "False"
    assert "NameError: name 'who' is not defined" in alice.value("who()")
    assert "apw-1" not in alice.transcript() and "bpw-2" not in bob.transcript()


def test_what_cannot_move_is_named_and_the_move_refused(
    telnet, free_port, control, procs, sessions
):
    """A generator in a namespace: the take fails naming it, the user is told, nothing moves."""
    server = serve(free_port, control, f"admin:{PASSWORD}")
    procs.append(server)
    me = Session(telnet, free_port, "admin", PASSWORD)
    sessions.append(me)
    assert me.type("import os") == ""
    assert me.type("squares = (n * n for n in range(5))") == ""
    refused = Proc([PYTHON, "-m", "takeover", "take", control])
    procs.append(refused)
    assert refused.wait(20) != 0
    error = refused.output()
    assert "squares (generator)" in error and "takeover: error:" in error, error
    me.child.expect(r"\*\*\* The server tried to move.*squares \(generator\).*stays here")
    me.child.expect(">>> ")
    assert me.value("os.getpid()") == str(server.pid)
    assert me.value("next(squares)") == "0"
    assert me.type("del squares") == ""
    recipient = move(PYTHON, control, server, procs)
    assert me.value("os.getpid()") == str(recipient.pid)


def test_login_refuses_a_wrong_password_without_echoing_it(telnet, free_port, control, procs):
    server = serve(free_port, control, f"admin:{PASSWORD}")
    procs.append(server)
    child = pexpect.spawn(telnet, ["127.0.0.1", str(free_port)], encoding="utf-8", timeout=20)
    log = io.StringIO()
    child.logfile_read = log
    try:
        child.expect("username: ")
        child.sendline("admin")
        child.expect("password: ")
        child.sendline("not-the-one")
        child.expect("Login incorrect")
        child.expect("username: ")
        child.sendline("admin")
        child.expect("password: ")
        child.sendline(PASSWORD)
        child.expect(">>> ")
        assert "not-the-one" not in log.getvalue()
        assert PASSWORD not in log.getvalue()
    finally:
        child.close(force=True)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def test_takeover_demo_tells_the_story_and_leaves_nothing_running(found):
    """``takeover demo``: login, the paper's commands, moves, then clean."""
    result = subprocess.run(
        [PYTHON, "-m", "takeover", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    control = re.search(r"--control (\S+)", out)
    port = re.search(r"--port (\d+)", out)
    assert control and port, out
    route = interpreters.choose(found)
    assert out.count("[Errno 3] No such process") == max(len(route), 1), out
    assert "password: " in out
    password = re.search(r"password (\S+)\n", out)
    assert password and out.count(password.group(1)) == 1, "the password was echoed"
    for target in route:
        assert f"{target.path} -m takeover take" in out
    assert _processes_mentioning(control.group(1)) == []
    assert _processes_mentioning(f"127.0.0.1\0{port.group(1)}") == []
    assert not os.path.exists(os.path.dirname(control.group(1)))


def test_ctrl_c_drops_the_block_and_ctrl_d_logs_out(telnet, free_port, control, procs, sessions):
    server = serve(free_port, control, f"admin:{PASSWORD}")
    procs.append(server)
    me = Session(telnet, free_port, "admin", PASSWORD)
    sessions.append(me)
    assert me.type("for i in range(3):") == ""
    me.child.sendcontrol("c")
    me.child.expect("KeyboardInterrupt")
    me.child.expect(">>> ")
    assert me.value("1 + 1") == "2"
    me.child.sendcontrol("d")
    me.child.expect("logout")
    me.child.expect(pexpect.EOF)


def test_the_demo_moves_to_the_newest_other_interpreter_then_pypy(found, cpython313, pypy):
    """The demo's quick route agrees with a full search: CPython 3.13 (the newest; 3.12
    from 3.13 itself), then PyPy (none from PyPy itself)."""
    route = interpreters.route()
    assert route == interpreters.choose(found)
    newest = _interpreter("3.12") if _is_this(cpython313) else cpython313
    expected = [newest] if _is_this(pypy) else [newest, pypy]
    assert [i.real for i in route] == [i.real for i in expected]
