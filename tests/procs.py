"""Helpers to run the examples and the command line as real processes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
APPS = os.path.join(ROOT, "tests", "apps")
PYTHON = sys.executable


def list_fds(pid: int) -> dict[int, str]:
    """Every open descriptor of ``pid`` and what it points at."""
    result: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            result[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            pass
    return result


def socket_inodes(pid: int) -> list[str]:
    """The sockets ``pid`` holds, one entry per descriptor (``socket:[N]``)."""
    return sorted(t for t in list_fds(pid).values() if t.startswith("socket:"))


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (``T`` when stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class Proc:
    """A child process whose output is read line by line in the background."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            text=True,
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for an output line matching ``pattern`` and return the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv}: no line matching {pattern!r} within {timeout} s; "
                    f"output so far:\n" + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"{self.argv} exited ({self.popen.poll()}) before printing {pattern!r}; "
                    "output:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match

    def output(self) -> str:
        """Everything printed so far (drains the queue without waiting)."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return "\n".join(self.lines)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit and return its status."""
        status = self.popen.wait(timeout)
        self._reader.join(timeout)
        return status

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(10)
        finally:
            if self.popen.stdout is not None:
                self._reader.join(5)
                self.popen.stdout.close()


def run_example(
    name: str, port: int, control: str, *extra: str, env: dict[str, str] | None = None
) -> Proc:
    """Start ``examples/NAME.py`` and wait until it serves."""
    proc = Proc(
        [
            PYTHON,
            os.path.join(EXAMPLES, f"{name}.py"),
            "--port",
            str(port),
            "--control",
            control,
            *extra,
        ],
        env=env,
    )
    proc.expect(r"control")
    return proc


def takeover(*args: str, env: dict[str, str] | None = None, python: str = PYTHON) -> Proc:
    """Start ``python -m takeover ARGS``."""
    return Proc([python, "-m", "takeover", *args], env=env)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
