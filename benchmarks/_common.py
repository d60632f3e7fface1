"""Helpers shared by the benchmark driver and the processes it starts.

Nothing here runs at import time: the recipient loads the originator's script
(``_echo_app.py``) by path, and that script imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
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

    def line(self, prefix: str, timeout: float) -> str:
        """Wait for a line starting with ``prefix`` and return it."""
        found: str = self._wait_for(
            lambda line: line if line.startswith(prefix) else None, f"line {prefix!r}", timeout
        )
        return found

    def _wait_for(self, match: Callable[[str], Any], what: str, timeout: float) -> Any:
        """The first non-None ``match(line)`` over the lines to come, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"{self.argv[1:]}: no {what} within {timeout} s; output:\n"
                    + "\n".join(self.lines)
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                raise RuntimeError(
                    f"{self.argv[1:]} exited ({self.popen.poll()}) before its {what}; "
                    "output:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            found = match(line)
            if found is not None:
                return found

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


def _cpus_allowed() -> list[int]:
    """The CPUs this process may run on (PyPy's ``os`` has no ``sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_split(pin: bool = True) -> tuple[list[int], list[int]]:
    """(server CPUs, client CPUs): with two CPUs or more and ``pin``, the clients get
    the last one and the servers the others, so that where the scheduler happens to
    put each new process does not change the figures; else both get ()."""
    cpus = _cpus_allowed()
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
    limit = len(_cpus_allowed())
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


def add_run_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every load-style benchmark shares: where and how to report."""
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default=name)
    parser.add_argument("--command", help="the command to quote in the report (default: argv)")
    parser.add_argument("--render", metavar="JSON", help="only redraw the markdown of JSON")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place processes")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this many seconds for the machine to quieten",
    )


def render_only(path: str, write: Callable[[dict[str, Any], str, str], Any]) -> None:
    """Redraw the markdown report of the results in ``path`` with ``write``."""
    with open(path) as f:
        loaded = json.load(f)
    directory, base = os.path.split(path)
    print(write(loaded, directory or ".", os.path.splitext(base)[0])[1])


def run_header(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """What every report starts with: kind, command, date, machine, repeats."""
    import scale

    command = args.command or " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]
    )
    return {
        "kind": kind,
        "command": command,
        "quiet_wait": args.quiet_wait,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": scale.machine(),
        "repeats": args.repeats,
    }
