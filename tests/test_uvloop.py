"""takeover's asyncio runtime on uvloop: an originator on uvloop, recipients on
either loop (``takeover take --loop uvloop``), streams checked byte for byte.

uvloop runs on CPython only: on PyPy these tests skip (the ``uvloop`` extra
installs nothing there); on CPython uvloop must be installed (``make venv``).
"""

from __future__ import annotations

import importlib.util
import platform
import re
import signal
import sys

import pytest

from harness.procs import PYTHON, Proc, socket_inodes, takeover
from services import run_app, tcp_sockets
from streaming import streaming

CLIENTS = 20


@pytest.fixture(autouse=True)
def uvloop_installed() -> None:
    """Skip where uvloop cannot run (PyPy, CI included); fail where it should be installed."""
    if platform.python_implementation() != "CPython":
        pytest.skip(f"uvloop does not run on {platform.python_implementation()}")
    if importlib.util.find_spec("uvloop") is None:
        pytest.fail("uvloop is not installed on CPython: make venv (the uvloop extra)")


def on_uvloop(pid: int) -> bool:
    """Whether process ``pid`` has uvloop's event loop module loaded."""
    with open(f"/proc/{pid}/maps") as f:
        return "/uvloop/loop." in f.read()


def service_sockets(pid: int, port: int) -> set[str]:
    """The sockets ``pid`` holds whose local port is ``port``: listener and connections."""
    return set(socket_inodes(pid)) & tcp_sockets(pid, port)


def test_streams_move_between_uvloop_and_the_default_loop(control, free_port, procs):
    """uvloop originator -> uvloop -> default loop -> uvloop: 20 checksummed two-way
    streams lose, duplicate or alter nothing, on the same TCP connections throughout."""
    previous = run_app(procs, free_port, control, "--loop", "uvloop")
    assert on_uvloop(previous.pid)
    with streaming(free_port, CLIENTS) as clients:
        clients.wait_all_echoing()
        sockets = service_sockets(previous.pid, free_port)
        assert len(sockets) == CLIENTS + 1  # the listener and every connection
        for loop in ("uvloop", "asyncio", "uvloop"):
            recipient = takeover("take", "--loop", loop, control)
            procs.append(recipient)
            recipient.expect(rf"^took a: {CLIENTS} connections")
            recipient.expect(r"^serving 1 service\(s\) at " + re.escape(control) + " ")
            assert previous.wait() == 0, previous.output()
            assert on_uvloop(recipient.pid) == (loop == "uvloop")
            # The very sockets moved: the kernel's, not new connections.
            assert service_sockets(recipient.pid, free_port) == sockets
            clients.wait_progress()
            previous = recipient
        outcome = clients.finish()
    assert outcome.errors == {}
    assert outcome.corrupted == {}
    assert outcome.incomplete == []
    previous.signal(signal.SIGTERM)
    assert previous.wait() == 0, previous.output()


def test_loop_uvloop_is_refused_with_the_twisted_runtime(control):
    """--loop uvloop with --runtime twisted: one error line, nothing attempted."""
    proc = takeover("take", "--loop", "uvloop", "--runtime", "twisted", control)
    try:
        assert proc.wait() != 0
        assert proc.output().splitlines() == [
            "takeover: error: --loop uvloop cannot serve --runtime twisted: the Twisted "
            "runtime runs in Twisted's own reactor (drop --loop, or take an asyncio service)"
        ]
    finally:
        proc.kill()


def test_loop_uvloop_without_uvloop_says_how_to_install_it(control):
    """Where uvloop cannot be imported, --loop uvloop fails with the extra to install."""
    hide = "import sys; sys.modules['uvloop'] = None; from takeover.cli import main; "
    argv = [PYTHON, "-c", hide + "sys.exit(main(sys.argv[1:]))", "take", "--loop", "uvloop"]
    proc = Proc([*argv, control])
    try:
        assert proc.wait() != 0
        assert proc.output().splitlines() == [
            f"takeover: error: --loop uvloop: uvloop is not installed in {sys.executable} "
            "(pip install 'takeover[uvloop]'; uvloop runs on CPython only)"
        ]
    finally:
        proc.kill()
