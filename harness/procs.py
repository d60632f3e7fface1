"""Real processes for the tests and the benchmarks, and what /proc says about them.

:class:`Proc` starts a process with its output (stdout and stderr together)
read line by line by a thread of its own, so that a caller can wait for a
line matching a pattern (:meth:`Proc.expect`) or for a JSON event line
(:meth:`Proc.event`) under a deadline, however much the process prints.
Waiting fails with :class:`ExpectError` (an ``AssertionError``, so that a test
fails rather than errors) saying what was awaited and showing the output.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
APPS = os.path.join(ROOT, "tests", "apps")
PYTHON = sys.executable


class ExpectError(AssertionError):
    """A process did not print the line waited for: in time, or before it exited."""


class Proc:
    """A child process whose output lines are read in the background.

    Args:
        argv: the command.
        env: variables added to this process's environment (and
            ``PYTHONUNBUFFERED=1``, so that a Python child's lines come as
            they are printed).
        stdin: give the child a pipe on stdin (:meth:`send_line`); else
            ``/dev/null``.
        cpus: run it on these CPUs only (``taskset``, which execs the
            command: the pid stays the command's).
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        stdin: bool = False,
        cpus: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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

    # -- waiting for output ------------------------------------------------------

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for an output line matching ``pattern`` (``re.search``); return the match."""
        regex = re.compile(pattern)
        found: re.Match[str] = self._wait_for(regex.search, f"line matching {pattern!r}", timeout)
        return found

    def event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the JSON line ``{"event": name, ...}`` and return it."""

        def parse(line: str) -> dict[str, Any] | None:
            if not line.startswith("{"):
                return None
            try:
                data = json.loads(line)
            except ValueError:
                return None
            return data if isinstance(data, dict) and data.get("event") == name else None

        found: dict[str, Any] = self._wait_for(parse, f"{name!r} event", timeout)
        return found

    def _wait_for(self, match: Callable[[str], Any], what: str, timeout: float) -> Any:
        """The first true ``match(line)`` over the lines to come, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ExpectError(
                    f"{self.argv}: no {what} within {timeout} s; output so far:\n"
                    + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise ExpectError(
                    f"{self.argv} exited ({self.popen.poll()}) before printing a {what}; "
                    "output:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            found = match(line)
            if found:
                return found

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

    # -- talking to it, ending it ------------------------------------------------

    def send_line(self, text: str) -> None:
        """Write ``text`` and a newline on its stdin (started with ``stdin=True``)."""
        assert self.popen.stdin is not None, "started without stdin=True"
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit and return its status."""
        status = self.popen.wait(timeout)
        self._reader.join(timeout)
        return status

    def signal(self, signum: int) -> None:
        """Send ``signum`` if it still runs."""
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """Kill the process if it still runs, reap it and close its pipes."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(10)
        finally:
            self._reader.join(5)
            pipes = [self.popen.stdin, self.popen.stdout]
            if self._reader.is_alive():
                # A process it started (an orphan now) still holds its stdout: closing
                # the pipe would wait forever for the reader blocked in it. Leave it to
                # the reader, which ends when that process does.
                pipes.remove(self.popen.stdout)
            for pipe in pipes:
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass


def run_example(
    name: str, port: int, control: str, *extra: str, env: dict[str, str] | None = None
) -> Proc:
    """Start ``examples/NAME.py`` and wait until it serves."""
    argv = [PYTHON, os.path.join(EXAMPLES, f"{name}.py"), "--port", str(port)]
    proc = Proc([*argv, "--control", control, *extra], env=env)
    proc.expect(r"control")
    return proc


def takeover(*args: str, env: dict[str, str] | None = None, python: str = PYTHON) -> Proc:
    """Start ``python -m takeover ARGS``."""
    return Proc([python, "-m", "takeover", *args], env=env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- what /proc says -------------------------------------------------------------


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
