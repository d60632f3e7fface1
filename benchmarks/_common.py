"""Helpers shared by the benchmark drivers and the processes they start.

Nothing here runs at import time: the recipient loads the originator's script
(``_echo_app.py``) by path, and that script imports this module. Starting
processes and reading their output is ``harness.procs``, shared with the tests.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
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


def nofile_for(need: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE so that this process (and the children it starts, which
    inherit it) may hold ``need`` descriptors; return (soft, hard).

    The soft limit goes up to the hard limit; past it only a privileged process
    (root: CAP_SYS_RESOURCE) may raise the hard limit, and never past
    ``/proc/sys/fs/nr_open``. Raises ``SystemExit`` with a message naming the
    limit that stands in the way.
    """
    soft, hard = raise_nofile()
    if soft == resource.RLIM_INFINITY or need <= soft:
        return soft, hard
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
    except (OSError, ValueError):
        nr_open = None
    if nr_open is not None and need > nr_open:
        raise SystemExit(
            f"{need} descriptors per process are needed, more than the kernel allows any "
            f"process (/proc/sys/fs/nr_open = {nr_open}); raise it (sysctl fs.nr_open) or "
            "run smaller sizes"
        )
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError) as e:
        why = (
            "it runs as root but without CAP_SYS_RESOURCE (a container's bounding set?)"
            if os.geteuid() == 0 and not _has_sys_resource()
            else "only a process with CAP_SYS_RESOURCE (root) may"
        )
        raise SystemExit(
            f"{need} descriptors per process are needed; RLIMIT_NOFILE's hard limit is "
            f"{hard} and this process may not raise it ({e}: {why}): raise the hard limit "
            f"where it is set (`ulimit -Hn {need}` in a privileged shell, systemd's "
            "LimitNOFILE, docker run --ulimit nofile=...), or run smaller sizes"
        ) from None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _has_sys_resource() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (capability 24) in its effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)
    except (OSError, ValueError):
        pass
    return False


def setup_process() -> tuple[int, int]:
    """What the originator and the recipient do first: raise RLIMIT_NOFILE and,
    with $BENCH_GC_OFF set (``scale.py --gc-off``), disable the cyclic GC."""
    if os.environ.get("BENCH_GC_OFF"):
        import gc

        gc.disable()
    return raise_nofile()


LOOPS = ("asyncio", "uvloop")


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on the event loop $BENCH_LOOP names (``scale.py --loop``):
    asyncio's own (default) or uvloop's."""
    loop = os.environ.get("BENCH_LOOP", "asyncio")
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    elif loop == "asyncio":
        import asyncio

        asyncio.run(main)
    else:
        raise SystemExit(f"BENCH_LOOP={loop!r}: not one of {', '.join(LOOPS)}")


def loop_name() -> str:
    """The running event loop's kind: ``uvloop`` or ``asyncio``."""
    import asyncio

    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def memory() -> dict[str, int]:
    """This process's resident memory in kB: now, peak (VmHWM) and ru_maxrss."""
    result = {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    result.update(proc_memory(os.getpid()))
    return result


def mallocstats(when: str) -> None:
    """Append pymalloc's statistics to $BENCH_MALLOCSTATS (a file), if set."""
    path = os.environ.get("BENCH_MALLOCSTATS")
    if not path:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "a") as out:
            print(f"== {when}: {memory()}", file=out, flush=True)
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of ``pid`` in kB (empty if it is gone).

    VmRSS counts the pages of the executable and libraries that are resident
    (RssFile), which the kernel may drop and fault back in whenever memory is
    short: RssAnon is the process's own memory alone."""
    result: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
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
        time.sleep(0.1)  # samples spread over half a second: the measurement itself
    return sum(samples) / len(samples)


def wait_quiet(max_wait: float) -> dict[str, float]:
    """Before a run on a shared machine: wait (up to ``max_wait`` s) until fewer
    processes are runnable than there are CPUs; say how busy it was."""
    limit = len(_cpus_allowed())
    start = time.monotonic()
    level = busy()
    while level >= limit and time.monotonic() - start < max_wait:  # a wait under a deadline
        time.sleep(0.5)
        level = busy()
    return {"waited_s": round(time.monotonic() - start, 2), "runnable": level}


async def _connections(control: str) -> int:
    import takeover.asyncio as takeover

    session = await takeover.connect(control)
    try:
        services = await session.list()
    finally:
        await session.close()
    return sum(int(s.get("connections", 0)) for s in services)


def wait_connections(control: str, count: int, timeout: float) -> None:
    """Wait until the service(s) at ``control`` hold ``count`` connections (accepted)."""
    import asyncio

    from harness.waiting import wait_until

    wait_until(
        lambda: asyncio.run(_connections(control)) >= count,
        timeout,
        what=f"the service at {control} to accept {count} connections",
    )


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, nearest rank."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


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


STALL_MIN = 0.001
"""Heartbeat gaps at least this long (s) are recorded; shorter ones are the loop's normal turn."""


async def heartbeat(gaps: list[list[float]], period: float = 0.0005) -> None:
    """Measure the event loop's stalls: sleep ``period`` s over and over and append
    ``[start, gap]`` (monotonic s) to ``gaps`` for every turn that took at least
    :data:`STALL_MIN`. A stall of the loop is a gap; its start is when the loop last
    ran this task, its end ``start + gap`` when it ran it again. Cancel to stop."""
    import asyncio

    clock = time.monotonic
    while True:
        start = clock()
        await asyncio.sleep(period)
        gap = clock() - start
        if gap >= STALL_MIN:
            gaps.append([start, gap])


# The load clients' latency samples: (send time, latency) pairs of doubles.
BIN_S = 0.02  # seconds of send time per bin of series()


def read_samples(path: str) -> list[tuple[float, float]]:
    values = array.array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    return list(zip(values[0::2], values[1::2]))


def series(samples: list[tuple[float, float]], t0: float, duration: float) -> dict[str, Any]:
    """Per BIN_S of send time: how many samples, their median and maximum latency (ms)."""
    bins: list[list[float]] = [[] for _ in range(int(duration / BIN_S) + 2)]
    for sent, latency in samples:
        index = int((sent - t0) / BIN_S)
        if 0 <= index < len(bins):
            bins[index].append(latency)
    t, p50, peak, count = [], [], [], []
    for i, values in enumerate(bins):
        if not values:
            continue
        values.sort()
        t.append(round(i * BIN_S, 4))
        p50.append(round(percentile(values, 50) * 1000, 4))
        peak.append(round(values[-1] * 1000, 4))
        count.append(len(values))
    return {"bin_s": BIN_S, "t": t, "p50_ms": p50, "max_ms": peak, "count": count}


# -- CPU time of the processes of a run ---------------------------------------------


def cpu_ns(pid: int) -> int | None:
    """CPU time (ns) ``pid`` has used so far: the sum of its threads' ``schedstat``.

    Nanoseconds, where ``/proc/PID/stat`` counts 10 ms ticks. A process that
    exited but is not reaped yet (a zombie) still has its main thread's total
    there (its other threads' are gone with them); None once it is reaped.
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def cpu_times(cpus: Sequence[int]) -> dict[str, float]:
    """Busy and total seconds so far of ``cpus`` (all of them if empty), from /proc/stat."""
    names = {f"cpu{c}" for c in cpus} if cpus else {"cpu"}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in names:
                ticks = [int(v) for v in fields[1:]]
                total += sum(ticks[:8])  # guest time is counted in user already
                busy += sum(ticks[:8]) - ticks[3] - ticks[4]  # not idle, not iowait
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy_s": busy / hz, "total_s": total / hz}
