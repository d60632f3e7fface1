"""How a move scales with the number of connections, and how far it is from the floor.

    python benchmarks/scale.py [--sizes 1,10,100,1000,10000] [--repeats 5] [--out DIR]

For each size N and each of R runs: start the originator (``_echo_app.py``, a
line echo, in its own process), open N idle TCP connections to it from this
process, move the service to a recipient process (``_recipient.py``, the
library API timed from inside), check that a sample of the connections still
echo through the recipient, and collect:

* pause: ``pause_ms`` as the recipient reports it (the originator's quiesce to
  the recipient's start, shared monotonic clock),
* take: the recipient's connect -> HELLO -> LIST -> TAKE ... committed and
  started,
* graph bytes, the phases of the move on both sides, and the peak RSS
  (VmHWM) of both processes;

and in the same run the floor (``_floor.py``): passing N + 1 descriptors over
SCM_RIGHTS between two processes in batches of 253, and pickling and
unpickling with nothing else the same graph (the server, its transports and
their protocols), and the N protocol objects alone.

Writes ``DIR/NAME.json`` (every run) and ``DIR/NAME.md`` (see report.py).
RLIMIT_NOFILE is raised to the hard limit in every process; a size that
does not fit under the hard limit is skipped and the report says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import struct
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


def open_clients(port: int, count: int) -> list[socket.socket]:
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def reset(clients: list[socket.socket]) -> None:
    """Close ``clients`` with a reset (SO_LINGER 0), leaving no TIME_WAIT behind.

    A run of 10,000 connections closed the usual way leaves 10,000 sockets in
    TIME_WAIT for 60 s. Five runs in a row pile them up, and their expiry
    runs in the kernel on the CPUs the next moves use: with 100,000 of them a
    10,000-connection pause took 75..100 ms instead of 50.
    """
    linger = struct.pack("ii", 1, 0)
    for client in clients:
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        client.close()
    clients.clear()


def check_echo(clients: list[socket.socket]) -> int:
    """Send a line on an even sample of ``clients`` and read it back; return how many."""
    step = max(1, len(clients) // SAMPLE)
    sample = clients[::step][:SAMPLE]
    for i, client in enumerate(sample):
        line = f"ping {i}\n".encode()
        client.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = client.recv(4096)
            if not chunk:
                raise RuntimeError(f"connection {i} closed after the move")
            got += chunk
        if got != line:
            raise RuntimeError(f"connection {i} echoed {got!r} for {line!r}")
    return len(sample)


def run_move(count: int, recipient_kind: str = "library", probes: int = 0) -> dict[str, Any]:
    """One move of a service with ``count`` idle connections.

    ``recipient_kind``: ``library`` (``_recipient.py``, timed from inside) or
    ``cli`` (``python -m takeover take --json``: pause and graph only).
    ``probes``: besides them, that many connections from ``_probe.py`` each
    sending a line every millisecond and timing its echo, through the move.
    """
    workdir = tempfile.mkdtemp(prefix="tkb", dir="/tmp")
    control = os.path.join(workdir, "c.sock")
    procs: list[Proc] = []
    clients: list[socket.socket] = []
    try:
        originator = Proc(
            [PYTHON, os.path.join(_common.HERE, "_echo_app.py"), "--control", control]
        )
        procs.append(originator)
        port = int(originator.event("ready", TIMEOUT)["port"])
        setup = time.monotonic()
        clients = open_clients(port, count)
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
        idle = _common.proc_memory(originator.pid)
        if recipient_kind == "cli":
            argv = [PYTHON, "-m", "takeover", "take", "--json", control]
        else:
            argv = [PYTHON, os.path.join(_common.HERE, "_recipient.py"), control]
        recipient = Proc(argv, stdin=True)
        procs.append(recipient)
        taken = recipient.event("taken", TIMEOUT)
        if taken["connections"] != count + probes:
            raise RuntimeError(f"{taken['connections']} connections moved, not {count + probes}")
        checked = check_echo(clients)
        reset(clients)
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
        reset(clients)
        shutil.rmtree(workdir, ignore_errors=True)
    marks = gone["marks"]
    return {
        "connections": count,
        "probes": probes,
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
        "originator_idle_memory": idle,
        "originator_memory": gone["memory"],
        "recipient_memory_before": taken.get("memory_before", {}),
        "recipient_memory": ended["memory"],
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
    parser.add_argument("--command", help="the command to quote in the report (default: argv)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="before each run, wait up to this many seconds for the machine to quieten",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    _soft, hard = _common.raise_nofile()
    if args.gc_off:
        os.environ["BENCH_GC_OFF"] = "1"
    command = args.command or " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv]
    )
    data: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "repeats": args.repeats,
        "recipient": args.recipient,
        "gc_off": args.gc_off,
        "probes": args.probes,
        "quiet_wait": args.quiet_wait,
        "sizes": sizes,
        "skipped": {},
        "runs": [],
        "floors": [],
    }
    for count in sizes:
        need = count + _common.FD_MARGIN
        if hard != resource.RLIM_INFINITY and need > hard:
            reason = f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed"
            print(f"N={count}: skipped: {reason}", file=sys.stderr, flush=True)
            data["skipped"][str(count)] = reason
            continue
        for repeat in range(args.repeats):
            quiet = _common.wait_quiet(args.quiet_wait)
            move = run_move(count, args.recipient, args.probes)
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
                f"{report.stall_line(move)}",
                file=sys.stderr,
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = report.write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
