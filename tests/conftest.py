"""Shared fixtures: real processes, real sockets, and fd accounting."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from procs import Proc, list_fds


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; any still running at the end are killed."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Fail a test that leaves descriptors open in the test process."""
    before = list_fds(os.getpid())
    yield
    after = list_fds(os.getpid())
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert not leaked, f"descriptors leaked by the test: {leaked}"
