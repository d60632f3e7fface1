"""Shared fixtures: real processes, real sockets, and fd accounting."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

# The repository's root, for harness/ (processes and the line echo, shared with
# the benchmarks; not installed). The tests' own helper modules (streaming.py,
# mitm.py, ...) are next to them in tests/, which pytest puts on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pythons
from harness import browser as _browser
from harness import procs as _procs
from harness import systemd as _systemd
from harness.procs import Proc, list_fds


@pytest.fixture
def workdir() -> Iterator[str]:
    """A short temporary directory (AF_UNIX paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tk", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def control(workdir: str) -> str:
    """A control socket path in a fresh directory."""
    return os.path.join(workdir, "control.sock")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _procs.free_port()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; any still running at the end are killed."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def systemd_available() -> None:
    """Skip where a systemd namespace cannot run (fail in CI): see harness/systemd.py."""
    reason = _systemd.unavailable()
    if reason is not None:
        pythons.skip_or_fail(f"a systemd namespace cannot run here: {reason}")


@pytest.fixture
def browser_available() -> None:
    """Skip where headless Chromium cannot run (fail in CI): see harness/browser.py."""
    reason = _browser.missing()
    if reason is not None:
        pythons.skip_or_fail(f"no browser for the browser tests: {reason}")


@pytest.fixture
def systemd_ns(systemd_available: None, workdir: str) -> Iterator[_systemd.SystemdNamespace]:
    """A real systemd as PID 1 of private namespaces, ``workdir`` shown inside at its path.

    At teardown it prints systemd's log and the units' output (pytest shows
    them when the test fails), then kills it all.
    """
    ns = _systemd.SystemdNamespace(binds=[workdir])
    ns.start()
    try:
        yield ns
    finally:
        print(ns.diagnostics())
        ns.stop()


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Fail a test that leaves descriptors open in the test process."""
    before = list_fds(os.getpid())
    yield
    if sys.implementation.name == "pypy":
        # PyPy finalizes garbage only when it collects: a socket a test dropped
        # would be closed in a later test, under the number that test's own
        # descriptor then has. Collected here, it is closed in its own test
        # (and a ResourceWarning names that test).
        gc.collect()
        gc.collect()
    after = list_fds(os.getpid())
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"descriptors leaked by the test: {leaked}"
