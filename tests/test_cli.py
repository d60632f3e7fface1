"""The ``takeover`` command line against real processes: listing, and one-line failures."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence

import pytest

import pythons
from harness.procs import PYTHON, ROOT, Proc, process_state, run_example, takeover
from harness.waiting import wait_until

ERROR_PREFIX = "takeover: error:"
SRC = os.path.join(ROOT, "src")
# A peer run as nobody may run another interpreter than this one's venv.
NOBODY_ENV = {"PYTHONPATH": SRC}


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``python -m takeover ARGS`` to completion; its status and output lines."""
    return finish(takeover(*args, env=env))


def finish(proc: Proc) -> tuple[int, list[str]]:
    try:
        status = proc.wait(timeout=30)
        return status, proc.output().splitlines()
    finally:
        proc.kill()


def one_error(status: int, lines: Sequence[str]) -> str:
    """Check a failed run printed exactly one error line and nothing else; return it."""
    assert status != 0, lines
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, lines
    assert lines == errors, f"more than the error line was printed: {lines}"
    return errors[0]


@pytest.fixture
def echo(control: str, free_port: int, procs: list[Proc]) -> Iterator[Proc]:
    """examples/echo.py serving on ``free_port`` with its control socket at ``control``."""
    proc = run_example("echo", free_port, control)
    procs.append(proc)
    assert os.path.exists(control)
    yield proc


def echo_client(port: int) -> socket.socket:
    """A client whose connection the echo server has accepted and served once."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"hello\n")
    assert client.recv(100) == b"hello\n"
    return client


def assert_still_serving(control: str, client: socket.socket) -> None:
    """The originator still publishes echo as available and still echoes on ``client``."""
    status, lines = run_cli("list", "--json", control)
    assert status == 0, lines
    assert json.loads(lines[0])["state"] == "available"
    client.sendall(b"still here\n")
    assert client.recv(100) == b"still here\n"


def test_list_shows_name_state_and_connections(echo, control, free_port):
    """``takeover list`` prints a table row: name, state, connection count, kind, address."""
    with echo_client(free_port), echo_client(free_port):
        status, lines = run_cli("list", control)
    assert status == 0, lines
    assert lines[0].split() == ["SERVICE", "STATE", "CONNECTIONS", "KIND", "ADDRESS"]
    assert lines[1].split() == ["echo", "available", "2", "asyncio", f"127.0.0.1:{free_port}"]
    assert len(lines) == 2


def test_list_json_is_one_object_per_service(echo, control, free_port):
    """``takeover list --json`` prints one JSON object per service."""
    with echo_client(free_port):
        status, lines = run_cli("list", "--json", control)
    assert status == 0, lines
    assert len(lines) == 1
    service = json.loads(lines[0])
    assert service["name"] == "echo"
    assert service["state"] == "available"
    assert service["connections"] == 1
    assert service["address"] == f"127.0.0.1:{free_port}"


def test_list_leaves_the_originator_serving(echo, control, free_port):
    """Listing does not disturb the originator: it keeps serving its connections."""
    with echo_client(free_port) as client:
        for _ in range(3):
            assert run_cli("list", control)[0] == 0
        assert_still_serving(control, client)
    assert echo.popen.poll() is None


@pytest.mark.parametrize("command", ["list", "take"])
def test_no_server_at_the_path(workdir, command):
    """A control path that does not exist is one error line naming the path."""
    missing = os.path.join(workdir, "missing.sock")
    line = one_error(*run_cli(command, missing))
    assert line == f"{ERROR_PREFIX} no migration server at {missing}: the path does not exist"


@pytest.mark.parametrize("command", ["list", "take"])
def test_stale_socket_file(workdir, command):
    """A socket file nothing listens on is one error line suggesting it is stale."""
    stale = os.path.join(workdir, "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(stale)
    assert os.path.exists(stale)
    line = one_error(*run_cli(command, stale))
    assert f"no migration server is listening at {stale}" in line
    assert "stale socket file" in line


def test_take_unknown_service(echo, control, free_port):
    """``take --service nosuch`` is one error line naming it and what is published."""
    with echo_client(free_port) as client:
        line = one_error(*run_cli("take", control, "--service", "nosuch"))
        assert "no service named 'nosuch'" in line
        assert "echo" in line
        assert_still_serving(control, client)


def test_a_graph_bigger_than_the_recipient_accepts_is_refused_before_any_pause(
    echo, control, free_port
):
    """The recipient says how big a graph it accepts (--max-frame-size); the originator
    refuses a bigger one after its dry run, before pausing anything, saying so."""
    clients = [echo_client(free_port) for _ in range(40)]
    try:
        line = one_error(*run_cli("take", "--max-frame-size", "1024", control))
        assert "the graph of 'echo' is " in line and "more than the recipient accepts" in line
        assert "(1,024, its --max-frame-size): take with a larger --max-frame-size" in line
        assert "nothing was paused" in line
        assert_still_serving(control, clients[0])
    finally:
        for client in clients:
            client.close()


def test_take_busy_service(echo, control, free_port, procs):
    """A second ``take`` of a service already moving to a stalled recipient is told it is busy."""
    with echo_client(free_port) as client:
        stalled = takeover("take", control, env={"TAKEOVER_FAULTS": "recipient.adopted=stop"})
        procs.append(stalled)
        wait_until(lambda: process_state(stalled.pid) == "T", what="the first recipient to stop")

        status, lines = run_cli("list", "--json", control)
        assert status == 0, lines
        assert json.loads(lines[0])["state"] == "in-transit"

        line = one_error(*run_cli("take", control))
        assert "service 'echo' is busy" in line

        # Killing the stalled recipient before it commits rolls the service back.
        stalled.kill()

        def available() -> bool:
            code, out = run_cli("list", "--json", control)
            return code == 0 and json.loads(out[0])["state"] == "available"

        wait_until(available, what="the service to roll back")
        assert_still_serving(control, client)


def setpriv_nobody() -> list[str]:
    """The command prefix that runs a peer as user nobody, and the interpreter it runs."""
    if os.geteuid() != 0:
        pythons.skip_or_fail("needs root to run a peer as another user")
    if shutil.which("setpriv") is None:
        pythons.skip_or_fail("needs setpriv (util-linux)")
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return [*prefix, python_for_nobody(tuple(prefix))]


@functools.cache
def python_for_nobody(prefix: tuple[str, ...]) -> str:
    """An interpreter that user nobody can run takeover with (``src`` on PYTHONPATH).

    This one, unless nobody may not read where it lives: pyenv's versions under
    root's 0700 home cannot load their libpython as nobody. Then any other that
    scripts/find-python finds: the peer's interpreter is not what is tested.
    """
    others = [pythons.find(spec) for spec in pythons.find_python.ALL]
    for python in dict.fromkeys([PYTHON, *[p for p in others if p]]):
        probe = subprocess.run(
            [*prefix, python, "-c", "import takeover"],
            env={**os.environ, "PYTHONPATH": SRC},
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return python
    pytest.fail(f"user nobody can run none of the interpreters found (this one: {PYTHON})")


def test_other_user_refused_by_peer_credentials(echo, control, workdir, free_port):
    """A recipient of another uid that can reach the socket is refused by SO_PEERCRED, by uid."""
    prefix = setpriv_nobody()
    nobody = pwd.getpwnam("nobody").pw_uid
    # The control socket is created 0600; open it up so that only the
    # SO_PEERCRED check stands between the other user and the originator.
    os.chmod(workdir, 0o755)
    os.chmod(control, 0o666)
    with echo_client(free_port) as client:
        line = one_error(
            *finish(Proc([*prefix, "-m", "takeover", "list", control], env=NOBODY_ENV))
        )
        assert f"uid {nobody}" in line
        assert "refused recipient" in line
        assert_still_serving(control, client)


def test_other_user_refused_by_socket_mode(echo, control, workdir, free_port):
    """The control socket's 0600 mode stops another user before it can connect."""
    prefix = setpriv_nobody()
    os.chmod(workdir, 0o755)
    assert os.stat(control).st_mode & 0o777 == 0o600
    with echo_client(free_port) as client:
        line = one_error(
            *finish(Proc([*prefix, "-m", "takeover", "take", control], env=NOBODY_ENV))
        )
        assert f"permission denied opening {control}" in line
        assert_still_serving(control, client)


def test_usage_error_exits_2_naming_what_is_missing():
    """A command line argparse cannot parse exits 2 with one error line naming what is missing."""
    status, lines = run_cli("list")
    assert status == 2
    # argparse's own format: a usage line, then "takeover list: error: ...".
    errors = [line for line in lines if line.startswith("takeover") and ": error:" in line]
    assert len(errors) == 1, lines
    assert "CONTROL" in errors[0]


def test_acquire_address_needs_cross_host(workdir):
    """--acquire-address without --cross-host is refused in one line, before connecting."""
    status, lines = run_cli(
        "take", os.path.join(workdir, "nothing.sock"), "--acquire-address", "true"
    )
    assert status != 0
    assert lines == [
        "takeover: error: --acquire-address is for a move across hosts: add --cross-host"
    ], lines
