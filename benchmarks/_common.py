"""Helpers shared by the benchmark driver and the processes it starts.

Nothing here runs at import time: the recipient loads the originator's script
(``_echo_app.py``) by path, and that script imports this module.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FD_MARGIN = 64
"""Descriptors a process needs besides one per connection (stdio, epoll, control...)."""


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def setup_process() -> tuple[int, int]:
    """What the originator and the recipient do first: raise RLIMIT_NOFILE and,
    with $BENCH_GC_OFF set (``scale.py --gc-off``), disable the cyclic GC."""
    if os.environ.get("BENCH_GC_OFF"):
        import gc

        gc.disable()
    return raise_nofile()


def memory() -> dict[str, int]:
    """This process's resident memory in kB: now, peak (VmHWM) and ru_maxrss."""
    result = {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    result.update(proc_memory(os.getpid()))
    return result


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB (empty if it is gone)."""
    result: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    result[key.lower() + "_kb"] = int(value.split()[0])
    except OSError:
        pass
    return result


def emit(event: str, **fields: Any) -> None:
    """Print one JSON line for the driver."""
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def profiler() -> Any:
    """A running cProfile profiler if $BENCH_PROFILE names a directory, else None."""
    if not os.environ.get("BENCH_PROFILE"):
        return None
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    return profile


def save_profile(profile: Any, role: str) -> None:
    """Stop ``profile`` and save it as $BENCH_PROFILE/ROLE-PID.prof."""
    if profile is None:
        return
    profile.disable()
    directory = os.environ["BENCH_PROFILE"]
    os.makedirs(directory, exist_ok=True)
    profile.dump_stats(os.path.join(directory, f"{role}-{os.getpid()}.prof"))


class Proc:
    """A child process whose output lines are read in the background."""

    def __init__(
        self, argv: Sequence[str], *, stdin: bool = False, cpus: Sequence[int] = ()
    ) -> None:
        self.argv = list(argv)
        if cpus:  # taskset execs the command: the pid stays the command's
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
            close_fds=True,
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

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for the JSON line ``{"event": name, ...}`` and return it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"{self.argv[1:]}: no {name!r} event within {timeout} s; output:\n"
                    + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise RuntimeError(
                    f"{self.argv[1:]} exited ({self.popen.poll()}) before its {name!r} event; "
                    "output:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("event") == name:
                    return data

    def line(self, prefix: str, timeout: float) -> str:
        """Wait for a line starting with ``prefix`` and return it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"{self.argv[1:]}: no line {prefix!r} within {timeout} s; output:\n"
                    + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise RuntimeError(
                    f"{self.argv[1:]} exited ({self.popen.poll()}) before a line {prefix!r}; "
                    "output:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        status = self.popen.wait(timeout)
        self._reader.join(timeout)
        return status

    def kill(self) -> None:
        """Kill the process if it still runs, reap it and close its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(10)
        finally:
            self._reader.join(5)
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass


def cpu_split(pin: bool = True) -> tuple[list[int], list[int]]:
    """(server CPUs, client CPUs): with two CPUs or more and ``pin``, the clients get
    the last one and the servers the others, so that where the scheduler happens to
    put each new process does not change the figures; else both get ()."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or not shutil.which("taskset"):
        return [], []
    return cpus[:-1], cpus[-1:]


def describe_pinning(server: Sequence[int], client: Sequence[int]) -> str:
    if not server:
        return "not pinned: the scheduler places every process"
    return (
        f"pinned with taskset: the servers (every process holding the service, and the "
        f"recipients) on CPU {','.join(map(str, server))}, the clients on CPU "
        f"{','.join(map(str, client))}"
    )


def busy() -> float:
    """Runnable processes on the machine (besides the caller), averaged over 0.5 s."""
    samples = []
    for _ in range(5):
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    samples.append(int(line.split()[1]) - 1)
        time.sleep(0.1)
    return sum(samples) / len(samples)


def wait_quiet(max_wait: float) -> dict[str, float]:
    """Before a run on a shared machine: wait (up to ``max_wait`` s) until fewer
    processes are runnable than there are CPUs; say how busy it was."""
    limit = len(os.sched_getaffinity(0))
    start = time.monotonic()
    level = busy()
    while level >= limit and time.monotonic() - start < max_wait:
        time.sleep(0.5)
        level = busy()
    return {"waited_s": round(time.monotonic() - start, 2), "runnable": level}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, nearest rank."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


PYTHON = sys.executable
