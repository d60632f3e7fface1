"""How a move scales with the number of connections, and how far it is from the floor.

    python benchmarks/scale.py [--sizes 1,10,100,1000,10000,100000] [--repeats 5] [--out DIR]
        [--probes 8] [--loop asyncio|uvloop] [--client-procs K]

For each size N and each of R runs: start the originator (``_echo_app.py``, a
line echo, in its own process), open N idle TCP connections to it from K
client processes (``_clients.py``; one per 25,000 connections by default,
each from its own source addresses 127.0.0.2, 127.0.0.3, ...: one address
holds at most the ephemeral port range), move the service to a recipient
process (``_recipient.py``, the library API timed from inside), check that a
sample of the connections still echo through the recipient, and collect:

* pause: ``pause_ms`` as the recipient reports it (the originator's quiesce to
  the recipient's start, shared monotonic clock),
* take: the recipient's connect -> HELLO -> LIST -> TAKE ... committed and
  started,
* graph bytes, the phases of the move on both sides, and the peak RSS
  (VmHWM) of both processes;
* RSS per connection: the originator's VmRSS with every connection, just
  before TAKE, less its VmRSS serving none (before the clients connect); the
  recipient's VmRSS once the service started less its VmRSS before it
  connected; each divided by the connections held (N and the probes);

and in the same run the floor (``_floor.py``): passing N + 1 descriptors over
SCM_RIGHTS between two processes in batches of 253, and pickling and
unpickling with nothing else the same graph (the server, its transports and
their protocols), and the N protocol objects alone.

Writes ``DIR/NAME.json`` (every run) and ``DIR/NAME.md`` (see report.py),
with the goals of issue 16 met or not (report.goals).
RLIMIT_NOFILE is raised first, in this process, for the largest size (N, the
probes and a margin): the soft limit to the hard one, and the hard one too
where the process may (root, up to /proc/sys/fs/nr_open); every process
started inherits it. A size that cannot fit is refused before anything runs,
with the limit named (``--skip-unfit``: skipped, and the report says why).
``--loop uvloop`` runs the originator and the recipient on uvloop
($BENCH_LOOP).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repository's root: harness/ (processes, shared with the tests; not installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
import report

from harness.procs import PYTHON, Proc

TIMEOUT = 120.0
SAMPLE = 16
"""Connections checked to still echo after each move."""


PER_PROCESS = 25000
"""Connections per client process by default (``--client-procs 0``)."""

ROUND = 3000
"""Connections opened at most per round, all client processes together: the
driver waits for the originator to have accepted them before the next round.
Under the listen backlog (4096, and net.core.somaxconn): past it the kernel
drops SYNs, and a client waits a second for its retransmission."""


def per_address() -> int:
    """Connections per source address: three quarters of the ephemeral port range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return max(100, (high - low + 1) * 3 // 4)


def somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4096


def client_procs(count: int, asked: int) -> int:
    """How many processes hold the ``count`` idle connections: ``asked``, or one per
    :data:`PER_PROCESS` (at least one)."""
    if asked > 0:
        return max(1, min(asked, count)) if count else 1
    return max(1, -(-count // PER_PROCESS))


def open_clients(
    port: int,
    control: str,
    count: int,
    procs: int,
    env: dict[str, str],
    started: list[Proc],
    addresses: int = 0,
) -> list[Proc]:
    """Start ``procs`` client processes (``_clients.py``) and open ``count`` idle
    connections from them, in rounds of at most :data:`ROUND`, each accepted by the
    originator at ``control`` before the next; print progress at large sizes."""
    shares = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    first = [sum(shares[:i]) for i in range(procs)]
    address = addresses or per_address()
    clients = []
    for i in range(procs):
        proc = Proc(
            [
                PYTHON,
                os.path.join(_common.HERE, "_clients.py"),
                str(port),
                "--first",
                str(first[i]),
                "--per-address",
                str(address),
                "--sample",
                str(max(1, -(-SAMPLE // procs))),
                "--timeout",
                str(TIMEOUT),
            ],
            env,
            stdin=True,
        )
        started.append(proc)
        clients.append(proc)
    step = max(1, min(ROUND, somaxconn() - 64))
    opened = [0] * procs
    total = 0
    start = time.monotonic()
    shown = start
    while total < count:
        this_round = min(step, count - total)
        asks = []
        for i in range(procs):  # the round spread over the processes, in proportion
            want = min(shares[i] - opened[i], -(-this_round // procs))
            asks.append(max(0, want))
        if not any(asks):
            break
        for proc, ask in zip(clients, asks):
            if ask:
                proc.send_line(f"open {ask}")
        for i, (proc, ask) in enumerate(zip(clients, asks)):
            if ask:
                opened[i] = int(proc.event("opened", TIMEOUT)["count"])
        total = sum(opened)
        _common.wait_connections(control, total, TIMEOUT)
        now = time.monotonic()
        if count >= 20000 and (now - shown > 2 or total == count):
            shown = now
            print(
                f"  setup: {total}/{count} connections from {procs} client process(es), "
                f"{now - start:.1f} s ({total / max(now - start, 1e-9):,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
    if total != count:
        raise RuntimeError(f"{total} connections opened, not {count}")
    return clients


def check_echo(clients: list[Proc]) -> int:
    """Each client process sends a line on a sample of its connections and reads it
    back; return how many were checked."""
    for proc in clients:
        proc.send_line("check")
    return sum(int(proc.event("checked", TIMEOUT)["count"]) for proc in clients)


def close_clients(clients: list[Proc]) -> None:
    """Each client process closes its connections with a reset (SO_LINGER 0), leaving
    no TIME_WAIT behind, and exits.

    A run of 10,000 connections closed the usual way leaves 10,000 sockets in
    TIME_WAIT for 60 s. Five runs in a row pile them up, and their expiry
    runs in the kernel on the CPUs the next moves use: with 100,000 of them a
    10,000-connection pause took 75..100 ms instead of 50.
    """
    for proc in clients:
        proc.send_line("quit")
    for proc in clients:
        proc.event("closed", TIMEOUT)
        proc.wait(TIMEOUT)


def per_connection(
    before: dict[str, int], after: dict[str, int], count: int, key: str = "vmrss_kb"
) -> float | None:
    """Bytes of RSS per connection between two readings of VmRSS (kB), or of ``key``."""
    if not count or key not in before or key not in after:
        return None
    return (after[key] - before[key]) * 1024 / count


def run_move(
    count: int,
    recipient_kind: str = "library",
    probes: int = 0,
    loop: str = "asyncio",
    procs_asked: int = 0,
    addresses: int = 0,
) -> dict[str, Any]:
    """One move of a service with ``count`` idle connections.

    ``recipient_kind``: ``library`` (``_recipient.py``, timed from inside) or
    ``cli`` (``python -m takeover take --json``: pause and graph only).
    ``probes``: besides them, that many connections from ``_probe.py`` each
    sending a line every millisecond and timing its echo, through the move.
    ``loop``: the event loop of the originator and the recipient.
    ``procs_asked``: client processes holding the idle connections (0: by size).
    ``addresses``: connections per source address (0: :func:`per_address`).
    """
    workdir = tempfile.mkdtemp(prefix="tkb", dir="/tmp")
    control = os.path.join(workdir, "c.sock")
    procs: list[Proc] = []
    clients: list[Proc] = []
    env = {"BENCH_LOOP": loop}
    nprocs = client_procs(count, procs_asked)
    try:
        originator = Proc(
            [PYTHON, os.path.join(_common.HERE, "_echo_app.py"), "--control", control], env
        )
        procs.append(originator)
        ready = originator.event("ready", TIMEOUT)
        port = int(ready["port"])
        if ready.get("loop") != loop:
            raise RuntimeError(f"the originator runs on {ready.get('loop')}, not {loop}")
        empty = _common.proc_memory(originator.pid)  # serving, no connection yet
        setup = time.monotonic()
        if count:
            clients = open_clients(port, control, count, nprocs, env, procs, addresses)
        probe = None
        if probes:
            probe = Proc(
                [
                    PYTHON,
                    os.path.join(_common.HERE, "_probe.py"),
                    str(port),
                    "--probes",
                    str(probes),
                ],
                stdin=True,
            )
            procs.append(probe)
            probe.event("ready", TIMEOUT)
        _common.wait_connections(control, count + probes, TIMEOUT)
        setup_s = time.monotonic() - setup
        idle = _common.proc_memory(originator.pid)  # every connection held, before TAKE
        if recipient_kind == "cli":
            argv = [PYTHON, "-m", "takeover", "take", "--json", "--loop", loop, control]
        else:
            argv = [PYTHON, os.path.join(_common.HERE, "_recipient.py"), control]
        recipient = Proc(argv, env, stdin=True)
        procs.append(recipient)
        taken = recipient.event("taken", TIMEOUT)
        if taken["connections"] != count + probes:
            raise RuntimeError(f"{taken['connections']} connections moved, not {count + probes}")
        if taken.get("loop", loop) != loop:
            raise RuntimeError(f"the recipient runs on {taken.get('loop')}, not {loop}")
        checked = check_echo(clients)
        close_clients(clients)
        clients = []
        gone = originator.event("exit", TIMEOUT)
        samples: list[list[float]] = []
        if probe is not None:
            time.sleep(0.05)  # the probes go on through the recipient for a while
            probe.send_line("quit")
            samples = probe.event("probes", TIMEOUT)["samples"]
            probe.wait(TIMEOUT)
        originator.wait(TIMEOUT)
        if recipient_kind == "cli":
            recipient.event("serving", TIMEOUT)
            ended = {"memory": _common.proc_memory(recipient.pid)}
            recipient.popen.send_signal(signal.SIGTERM)
        else:
            recipient.send_line("quit")
            ended = recipient.event("exit", TIMEOUT)
        recipient.wait(TIMEOUT)
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    marks = gone["marks"]
    held = count + probes
    before_take = taken.get("memory_before", {})
    after_take = taken.get("memory_after", {})
    return {
        "connections": count,
        "probes": probes,
        "loop": loop,
        "client_procs": nprocs if count else 0,
        "source_addresses": -(-count // (addresses or per_address())),
        "probe": report.probe_summary(samples, marks) if probe is not None else None,
        "originator_gaps": report.gaps_near(gone.get("gaps", []), marks),
        "recipient_gaps": report.gaps_near(taken.get("gaps", []), marks),
        "recipient": recipient_kind,
        "pause_ms": taken["pause_ms"],
        "take_ms": taken.get("take_ms"),
        "total_ms": taken.get("total_ms"),
        "connect_ms": taken.get("connect_ms"),
        "graph_bytes": taken["graph_bytes"],
        "fds": taken["fds"],
        "echo_checked": checked,
        "setup_s": setup_s,
        "originator_marks": gone["marks"],
        "recipient_marks": taken.get("marks", {}),
        "recipient_started": taken.get("started"),
        "originator_empty_memory": empty,
        "originator_idle_memory": idle,
        "originator_memory": gone["memory"],
        "recipient_memory_before": before_take,
        "recipient_memory_after": after_take,
        "recipient_memory": ended["memory"],
        # RSS per connection held (the N idle ones and the probes), bytes:
        # originator: with every connection, before TAKE, less serving with none;
        # recipient: the service started, less before it connected.
        "originator_rss_per_connection": per_connection(empty, idle, held),
        "recipient_rss_per_connection": per_connection(before_take, after_take, held),
        # The same in RssAnon: without the pages of the executable and
        # libraries, which come and go with the machine's other work.
        "originator_anon_per_connection": per_connection(empty, idle, held, "rssanon_kb"),
        "recipient_anon_per_connection": per_connection(
            before_take, after_take, held, "rssanon_kb"
        ),
    }


def run_floor(count: int) -> dict[str, Any]:
    proc = Proc([PYTHON, os.path.join(_common.HERE, "_floor.py"), str(count)])
    try:
        result = proc.event("floor", TIMEOUT)
        proc.wait(TIMEOUT)
    finally:
        proc.kill()
    return result


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", _common.ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", _common.ROOT, "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20),
        "nofile": [soft, hard],
        "commit": commit,
        "src_dirty": dirty,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100,1000,10000", help="comma-separated N")
    parser.add_argument("--repeats", type=int, default=5, help="runs per size (R)")
    parser.add_argument("--out", default=os.path.join(_common.HERE, "results"), help="directory")
    parser.add_argument("--name", default="scale", help="writes NAME.json and NAME.md")
    parser.add_argument(
        "--recipient",
        choices=("library", "cli"),
        default="library",
        help="library: benchmarks/_recipient.py, timed inside (default); "
        "cli: takeover take --json (pause and graph only)",
    )
    parser.add_argument(
        "--gc-off",
        action="store_true",
        help="disable the cyclic GC in the originator and the recipient (an experiment)",
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=8,
        help="probe connections timing an echo every ms through the move (0: none)",
    )
    parser.add_argument(
        "--loop",
        choices=_common.LOOPS,
        default="asyncio",
        help="the event loop of the originator and the recipient (uvloop: CPython only)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        metavar="K",
        help=f"processes holding the idle connections, N/K each "
        f"(default 0: one per {PER_PROCESS:,} connections)",
    )
    parser.add_argument(
        "--per-address",
        type=int,
        default=0,
        metavar="M",
        help="idle connections per source address (default 0: three quarters of the "
        "ephemeral port range)",
    )
    parser.add_argument(
        "--skip-unfit",
        action="store_true",
        help="skip (and report) a size RLIMIT_NOFILE cannot hold instead of refusing to run",
    )
    parser.add_argument(
        "--shrink-unfit",
        action="store_true",
        help="run a size RLIMIT_NOFILE cannot hold at the largest size it can (whole "
        "thousands), and say so in the report, instead of refusing to run",
    )
    parser.add_argument("--command", help="the command to quote in the report (default: argv)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each run, wait up to this many seconds for the machine to quieten",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.loop == "uvloop":
        import importlib.util

        if importlib.util.find_spec("uvloop") is None:
            parser.error(
                f"--loop uvloop: uvloop is not installed in {sys.executable} "
                "(pip install 'takeover[uvloop]'; CPython only)"
            )
    # The originator and the recipient each hold every connection (and the
    # probes): raise RLIMIT_NOFILE here, before anything starts, for the largest
    # size; every process started inherits it. Refused here, nothing has run.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    skipped: dict[str, str] = {}

    def need(count: int) -> int:
        return count + args.probes + _common.FD_MARGIN

    # A size shrunk to what fits (--shrink-unfit): {asked: run, as strings}.
    shrunk: dict[str, int] = {}
    try:
        _common.nofile_for(need(max(sizes, default=0)))
    except SystemExit as e:
        if not (args.skip_unfit or args.shrink_unfit):
            parser.exit(2, f"{parser.prog}: error: N={max(sizes)}: {e}\n")
        for count in sizes:
            try:
                _common.nofile_for(need(count))
            except SystemExit as refused:
                skipped[str(count)] = str(refused)
                fit = (_common.raise_nofile()[0] - need(0)) // 1000 * 1000
                if args.shrink_unfit and fit > max([c for c in sizes if c < count], default=0):
                    shrunk[str(count)] = fit
                    print(f"N={count}: run at N={fit}: {refused}", file=sys.stderr, flush=True)
                else:
                    print(f"N={count}: skipped: {refused}", file=sys.stderr, flush=True)
        sizes = sorted(
            {shrunk.get(str(c), c) for c in sizes if str(c) in shrunk or str(c) not in skipped}
        )
    if args.gc_off:
        os.environ["BENCH_GC_OFF"] = "1"
    command = args.command or " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]
    )
    data: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "nofile_before": list(nofile),
        "repeats": args.repeats,
        "recipient": args.recipient,
        "loop": args.loop,
        "gc_off": args.gc_off,
        "probes": args.probes,
        "quiet_wait": args.quiet_wait,
        "sizes": sizes,
        "skipped": skipped,
        "shrunk": shrunk,
        "runs": [],
        "floors": [],
    }
    for count in sizes:
        if str(count) in skipped:
            continue
        for repeat in range(args.repeats):
            quiet = _common.wait_quiet(args.quiet_wait)
            move = run_move(
                count, args.recipient, args.probes, args.loop, args.client_procs, args.per_address
            )
            move["quiet"] = quiet
            floor = run_floor(count)
            data["runs"].append(move)
            data["floors"].append(floor)
            graph_floor = report._graph_floor_ms(floor) or 0.0
            app_floor = report._floor_ms(floor)
            print(
                f"N={count} run {repeat + 1}/{args.repeats}: pause {move['pause_ms']:.3f} ms, "
                f"take {move['take_ms'] or 0:.3f} ms, graph {move['graph_bytes']} B, "
                f"floor {graph_floor:.3f} ms (same graph), {app_floor:.3f} ms (app objects); "
                f"{report.stall_line(move)}; setup {move['setup_s']:.1f} s "
                f"({move['client_procs']} client process(es)); {report.rss_line(move)}",
                file=sys.stderr,
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = report.write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
