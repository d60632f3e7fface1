"""What clients see under load while the service is moved again and again.

    python benchmarks/load.py [--apps echo,http] [--connections 100] [--duration 10]
        [--move-every 0.2] [--repeats 3] [--modes steady,moving,starts,moving_starts]
        [--mover library|cli] [--out DIR] [--name load]

For each repeat and each app (``examples/echo.py``, ``examples/http_counter.py``)
runs of the same length, back to back: **steady** (the service stays where it
is), **moving** (moved every ``--move-every`` seconds, each move once the
previous one printed its ``serving`` line, for the whole run, into recipients
all started before the run), and two that show what starting the recipient
processes during the run costs: **starts only** (recipients started at that
rate and stopped unused) and **moving + starts** (both). The load is
``_client.py``: N connections in one process, each sending its next request
as soon as the previous one is answered, every answer checked (echo: byte for
byte and a CRC32 of each direction; http: the request's own path, and hit
numbers 1..n each once across all answers), stopping by themselves at the end
of the run. Every connection is accepted before the run starts, and the
clients keep their connections open, idle, until the last move is over, so
that every move carries all N: a move that carries fewer is a failure.

Writes ``DIR/NAME.json`` and ``DIR/NAME.md``; ``--render NAME.json`` redraws the
markdown from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repository's root: harness/ (processes, shared with the tests; not installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common
from _common import percentile, read_samples, series

from harness.procs import PYTHON, ExpectError, Proc, free_port

EXAMPLES = os.path.join(_common.ROOT, "examples")
CLIENT = os.path.join(_common.HERE, "_client.py")
UVLOOP_LAUNCHER = os.path.join(_common.HERE, "_on_uvloop.py")
LOOPS = ("asyncio", "uvloop")
TIMEOUT = 60.0
MODES = ("steady", "moving", "starts", "moving_starts")
MODE_NAMES = {
    "steady": "steady",
    "moving": "moving",
    "starts": "starts only",
    "moving_starts": "moving + starts",
}
SPARES = 3
"""Recipients kept started ahead while the run starts them (starts, moving + starts)."""
PIN: dict[str, list[int]] = {"server": [], "client": []}
"""CPUs for the servers and for the clients (``--no-pin``: none)."""
"""Width of the time bins of the latency series (for the plot)."""


MOVERS = {
    "library": "`benchmarks/_mover.py`, which does what `takeover take --json` does through the "
    "library API, started ahead (interpreter and imports loaded) and told when to take",
    "cli": "`python -m takeover take --json CONTROL`, started at each move",
}


def take_argv(control: str, loop: str = "asyncio") -> list[str]:
    return [PYTHON, "-m", "takeover", "take", "--loop", loop, "--json", control]


def on_uvloop(pid: int) -> bool:
    """Whether process ``pid`` has uvloop's event loop module loaded."""
    with open(f"/proc/{pid}/maps") as f:
        return "/uvloop/loop." in f.read()


def check_loop(proc: Proc, loop: str, role: str) -> None:
    """A run says which loop it measured: make sure that is the loop ``proc`` runs."""
    if on_uvloop(proc.pid) != (loop == "uvloop"):
        raise RuntimeError(
            f"the {role} (pid {proc.pid}, {' '.join(proc.argv[1:3])}) "
            f"{'does not run' if loop == 'uvloop' else 'runs'} on uvloop, "
            f"but the run is --loop {loop}"
        )


def start_app(app: str, port: int, control: str, loop: str = "asyncio") -> Proc:
    script = os.path.join(EXAMPLES, {"echo": "echo.py", "http": "http_counter.py"}[app])
    # The example unchanged; on uvloop through a launcher that sets uvloop's policy.
    argv = [PYTHON, script] if loop == "asyncio" else [PYTHON, UVLOOP_LAUNCHER, script]
    proc = Proc([*argv, "--port", str(port), "--control", control], cpus=PIN["server"])
    proc.expect("^" + re.escape(f"{app} on "), TIMEOUT)
    check_loop(proc, loop, "server")
    return proc


def latency_stats(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] if ordered else float("nan")) * 1000,
    }


def check_hits(hits: list[int]) -> dict[str, int]:
    """Hit numbers must be 1..n, each once: no request lost, none served twice."""
    seen = set(hits)
    n = len(hits)
    return {
        "answers": n,
        "duplicates": n - len(seen),
        "missing": sum(1 for i in range(1, n + 1) if i not in seen),
        "max": max(hits) if hits else 0,
    }


def mover_argv(control: str, loop: str = "asyncio") -> list[str]:
    return [PYTHON, os.path.join(_common.HERE, "_mover.py"), control, "--loop", loop]


def spare(control: str, loop: str = "asyncio") -> Proc:
    """A recipient started ahead (``_mover.py``), waiting to be told to take."""
    return Proc(mover_argv(control, loop), stdin=True, cpus=PIN["server"])


CPU_STATES = ("serving", "recipient_start", "recipient_take", "originator_move", "old_after")
"""What a server-side process is doing, for the split of the server CPUs' time:
holding the service (``serving``); a recipient from its start (or the run's) until
told to take (``recipient_start``), then until it serves (``recipient_take``); the
holder from its successor's go until that one serves (``originator_move``: the dry
run, the sockets sent ahead, the pause, and serving its clients until the pause),
then until the end of the run (``old_after``: its release and exit)."""


class CpuLog:
    """CPU time (``/proc/PID/task/*/schedstat``, ns) of the server-side processes of a
    run, each charged to the state it was in between two samples."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(CPU_STATES, 0.0)
        self.last: dict[int, tuple[int, str]] = {}

    def new(self, pid: int, state: str) -> None:
        """A process started during the run: it had used nothing yet."""
        self.last[pid] = (0, state)

    def switch(self, pid: int, state: str | None) -> None:
        """Sample ``pid`` and charge its CPU since the last sample to its previous
        state; None: stop following it."""
        now = _common.cpu_ns(pid)
        before = self.last.pop(pid, None)
        if now is None:
            return
        if before is not None:
            self.ms[before[1]] += (now - before[0]) / 1e6
        if state is not None:
            self.last[pid] = (now, state)

    def close(self) -> None:
        for pid in list(self.last):
            self.switch(pid, None)


def run_load(
    app: str,
    mode: str,
    connections: int,
    duration: float,
    move_every: float,
    mover: str = "library",
    warmup: float = 0.0,
    loop: str = "asyncio",
) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="tkl", dir="/tmp")
    control = os.path.join(workdir, "c.sock")
    samples_path = os.path.join(workdir, "samples.bin")
    holders: list[Proc] = []
    client: Proc | None = None
    moves: list[dict[str, Any]] = []
    failures: list[str] = []
    spares: list[Proc] = []
    ready: set[int] = set()
    cpu = CpuLog()
    started_here: set[int] = set()

    def new_spare() -> Proc:
        proc = spare(control, loop)
        if t0 is not None:  # started during the run
            cpu.new(proc.pid, "recipient_start")
            started_here.add(proc.pid)
        return proc

    def make_ready(proc: Proc) -> None:
        if proc.pid not in ready:
            proc.event("ready", TIMEOUT)
            ready.add(proc.pid)
            check_loop(proc, loop, "recipient")

    t0: float | None = None
    try:
        port = free_port()
        holders.append(start_app(app, port, control, loop))
        client = Proc(
            [
                PYTHON,
                CLIENT,
                "--port",
                str(port),
                "--app",
                app,
                "--connections",
                str(connections),
                "--duration",
                str(duration),
                "--samples",
                samples_path,
                "--warmup",
                str(warmup),
                "--hold",
            ],
            stdin=True,
            cpus=PIN["client"],
        )
        client.event("connected", TIMEOUT)
        # Accepted before the run, and (--hold) kept until the moves are over:
        # every move carries every connection.
        _common.wait_connections(control, connections, TIMEOUT)
        moving = mode in ("moving", "moving_starts")
        # moving + starts and the control keep SPARES recipients started ahead
        # and start the next one as each is used, so that a busy machine
        # starting Python slowly does not hold up the moves.
        replenish = mode in ("starts", "moving_starts") and mover != "cli"
        if replenish:
            spares = [new_spare() for _ in range(SPARES)]
        elif moving and mover != "cli":
            # moving: every recipient of the run is started before it begins.
            spares = [new_spare() for _ in range(int(duration / move_every) + 1)]
        for proc in spares:
            make_ready(proc)
        load_before = os.getloadavg()
        client.send_line("go")
        t0 = float(client.event("started", TIMEOUT)["t0"])
        # From here, the CPU time of every server-side process, and of the server CPUs.
        cpus_before = _common.cpu_times(PIN["server"])
        driver_before = os.times()
        cpu.switch(holders[0].pid, "serving")
        for proc in spares:
            cpu.switch(proc.pid, "recipient_start")
        if mode != "steady":
            k = 1
            while True:
                tick = t0 + k * move_every
                if tick >= t0 + duration:
                    break
                now = time.monotonic()
                if tick > now:
                    time.sleep(tick - now)  # the schedule of the moves: what is measured
                if mode == "starts":
                    # The control: the same processes started, and stopped unused.
                    proc = spares.pop(0)
                    make_ready(proc)
                    cpu.switch(proc.pid, None)
                    proc.kill()
                    spares.append(new_spare())
                    k = max(k + 1, int((time.monotonic() - t0) / move_every) + 1)
                    continue
                try:
                    originator = holders[-1]
                    if mover == "cli":
                        start = time.monotonic()
                        proc = Proc(take_argv(control, loop), cpus=PIN["server"])
                        cpu.new(proc.pid, "recipient_take")
                        holders.append(proc)
                    else:
                        # (Started here only if the run outlasts the recipients
                        # started for it.)
                        proc = spares.pop(0) if spares else new_spare()
                        holders.append(proc)
                        make_ready(proc)
                        cpu.switch(proc.pid, "recipient_take")
                        start = time.monotonic()
                        proc.send_line("go")
                    cpu.switch(originator.pid, "originator_move")
                    taken = proc.event("taken", TIMEOUT)
                    taken_at = time.monotonic()
                    proc.event("serving", TIMEOUT)
                    cpu.switch(proc.pid, "serving")
                    cpu.switch(originator.pid, "old_after")
                    if mover == "cli":
                        check_loop(proc, loop, "recipient")
                except ExpectError as exc:
                    failures.append(str(exc))
                    break
                if taken["connections"] != connections:
                    failures.append(
                        f"move at {start - t0:.3f} s carried {taken['connections']} of "
                        f"{connections} connections"
                    )
                if replenish:
                    spares.append(new_spare())
                moves.append(
                    {
                        "start": start - t0,
                        "taken": taken_at - t0,
                        "serving": time.monotonic() - t0,
                        "pause_ms": taken["pause_ms"],
                        "connections": taken["connections"],
                    }
                )
                k = max(k + 1, int((time.monotonic() - t0) / move_every) + 1)
        for proc in spares:
            cpu.switch(proc.pid, None)
            proc.kill()
        done = client.event("done", duration + TIMEOUT)
        # The end of the run: every process the service left has exited by now
        # (not reaped yet: a zombie still has its CPU time).
        cpu.close()
        cpus_after = _common.cpu_times(PIN["server"])
        driver_after = os.times()
        client.send_line("close")  # the moves are over: the connections may go
        client.wait(TIMEOUT)
        last = holders[-1]
        last.popen.send_signal(signal.SIGTERM)
        last.wait(TIMEOUT)
        exits = []
        for proc in holders[:-1]:
            try:
                exits.append(proc.wait(TIMEOUT))
            except Exception as exc:  # a holder that never left
                failures.append(f"{proc.argv[1:]}: {exc}")
        bad = [rc for rc in exits if rc != 0]
        if bad:
            failures.append(f"{len(bad)} process(es) the service left exited with {bad}")
        samples = read_samples(samples_path)
    finally:
        for proc in holders:
            proc.kill()
        for proc in spares:
            proc.kill()
        if client is not None:
            client.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    hits = done.pop("hits")
    latencies = [latency for _sent, latency in samples]
    in_pause = []
    if moves:
        windows = sorted((t0 + m["taken"] - m["pause_ms"] / 1000, t0 + m["taken"]) for m in moves)
        for sent, latency in samples:
            for a, b in windows:
                if sent <= b and sent + latency >= a:
                    in_pause.append(latency)
                    break
    result = {
        "app": app,
        "mode": mode,
        "connections": connections,
        "duration": duration,
        **done,
        "throughput_rps": done["completed"] / done["wall_s"],
        "client_cpu_share": done["cpu_s"] / done["wall_s"],
        "latency": latency_stats(latencies),
        "latency_across_pause": latency_stats(in_pause),
        "moves": moves,
        "loop": loop,
        "cpu": {
            "split_ms": cpu.ms,
            "server_cpus_busy_s": cpus_after["busy_s"] - cpus_before["busy_s"],
            "server_cpus_total_s": cpus_after["total_s"] - cpus_before["total_s"],
            "server_cpus": PIN["server"],
            "driver_s": (driver_after.user + driver_after.system)
            - (driver_before.user + driver_before.system),
            "recipients_started_in_run": len(started_here),
        },
        "failures": failures,
        "loadavg": [load_before, os.getloadavg()],
        "series": series(samples, t0, duration),
    }
    if app == "http":
        result["hits_check"] = check_hits(hits)
    return result


# -- the report ----------------------------------------------------------------


def cell(values: Sequence[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def lost_or_duplicated(run: dict[str, Any]) -> int:
    if run["app"] == "http":
        check = run["hits_check"]
        return int(check["duplicates"] + check["missing"] + (check["max"] != check["answers"]))
    return int(run["echo_byte_difference"] + run["echo_crc_mismatches"])


def pairs(
    data: dict[str, Any], app: str, mode: str = "moving", base: str = "steady"
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(base, mode) runs of one app from the same repeat."""
    runs = [r for r in data["runs"] if variant(r) == app]
    first = {r["repeat"]: r for r in runs if r["mode"] == base}
    second = [r for r in runs if r["mode"] == mode and r["repeat"] in first]
    return [(first[r["repeat"]], r) for r in second]


def variant(run: dict[str, Any]) -> str:
    """The app, and the loop if it is not asyncio's own: what the tables' rows are of."""
    loop = run.get("loop", "asyncio")
    return str(run["app"]) if loop == "asyncio" else f"{run['app']} ({loop})"


def variants(data: dict[str, Any]) -> list[str]:
    """Rows in the order of the run: each app on each loop."""
    return list(dict.fromkeys(variant(r) for r in data["runs"]))


GOALS = (
    # (key, what, the runs, the figure, at most or at least, target)
    ("p99", "p99 moving / steady", "moving", "p99_ms", "<=", 2.0),
    ("rps", "requests/s moving / steady", "moving", "throughput_rps", ">=", 0.9),
)
GOAL_CONDITIONS = {"connections": 100, "move_every": 0.2}
"""Where the goals are set (issue 16): 100 clients, a move every 200 ms, recipients
started before the moves."""


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal for each app and loop: the median over the repeats of the ratio
    moving / steady taken within each repeat, the target, and whether it is met."""
    rows = []
    for app in variants(data):
        for key, what, mode, figure, sense, target in GOALS:
            ratios = []
            for steady, moving in pairs(data, app, mode):
                if figure == "throughput_rps":
                    ratios.append(moving[figure] / steady[figure])
                else:
                    ratios.append(moving["latency"][figure] / steady["latency"][figure])
            if not ratios:
                continue
            measured = statistics.median(ratios)
            met = measured <= target if sense == "<=" else measured >= target
            rows.append(
                {
                    "app": app,
                    "goal": key,
                    "what": what,
                    "measured": round(measured, 3),
                    "range": [round(min(ratios), 3), round(max(ratios), 3)],
                    "target": f"{sense} {target:g}",
                    "met": met,
                }
            )
    return rows


def render_goals(data: dict[str, Any]) -> list[str]:
    out = ["## Goals", ""]
    conditions = {k: data.get(k) for k in GOAL_CONDITIONS}
    out += [
        "Issue 16's goals, under load (100 clients, a move every 200 ms, recipients started",
        "before the moves): each the median over the repeats of the ratio moving / steady",
        "taken within one repeat (the two runs side by side, a minute apart at most).",
    ]
    if conditions != GOAL_CONDITIONS:
        out += [
            f"This run is not at the goals' conditions ({data['connections']} clients, a move",
            f"every {data['move_every'] * 1000:.0f} ms): the same ratios, for comparison only.",
        ]
    rows = [
        [
            g["app"],
            g["what"],
            f"{g['measured']:.2f} ({g['range'][0]:.2f}..{g['range'][1]:.2f})",
            g["target"],
            "met" if g["met"] else "**not met**",
        ]
        for g in data.get("goals") or goals(data)
    ]
    return [*out, "", *_table(["app", "goal", "measured", "target", "met"], rows), ""]


def render_cpu(data: dict[str, Any]) -> list[str]:
    """Where the server CPUs' time went in each kind of run (median over the repeats)."""
    runs = [r for r in data["runs"] if r.get("cpu")]
    if not runs:
        return []
    out = [
        "## Where the server CPUs' time goes",
        "",
        "CPU time of every server-side process (`/proc/PID/task/*/schedstat`, from the",
        "client's start to its end), each charged to what the process was doing:",
        "*serving* (holding the service), *recipients started* (a recipient from its start,",
        "or the run's, until told to take: starting Python and importing, or waiting idle),",
        "*recipient take* (told to take → its `serving` line: connecting, receiving the",
        "sockets sent ahead and building them, the graph, unpickling, starting),",
        "*originator in move* (the holder from its successor's go to the successor's",
        "`serving` line: the dry run, the sockets sent ahead, the pause, and serving its",
        "clients until the pause), *old process after* (the holder the service left, from",
        "the successor's `serving` to its exit: release, exit). *Other on the server CPUs*:",
        "the server CPUs' busy time (/proc/stat) less all of the above: the benchmark's",
        "driver when the scheduler puts it there, the kernel, other work on a shared",
        "machine. *Overhead per move*: the server processes' CPU less the run's requests at",
        "the steady run's CPU per request, divided by the moves.",
        "",
    ]
    rows = []
    for app in variants(data):
        steady_per_request = {
            r["repeat"]: sum(r["cpu"]["split_ms"].values()) / r["completed"]
            for r in runs
            if variant(r) == app and r["mode"] == "steady" and r["completed"]
        }
        for mode in MODES:
            group = [r for r in runs if variant(r) == app and r["mode"] == mode]
            if not group:
                continue

            def pct(value: Any, group: list[dict[str, Any]] = group) -> str:
                return cell([value(r) * 100 for r in group], 0)

            def wall(r: dict[str, Any]) -> float:
                c = r["cpu"]
                return float(c["server_cpus_total_s"]) / max(1, len(c["server_cpus"]) or 1) * 1000

            def per_move(state: str, group: list[dict[str, Any]] = group) -> str:
                values = [
                    r["cpu"]["split_ms"][state] / len(r["moves"]) for r in group if r["moves"]
                ]
                return cell(values, 1) if values else ""

            def overhead(
                r: dict[str, Any], steady_per_request: dict[int, float] = steady_per_request
            ) -> float | None:
                base = steady_per_request.get(r["repeat"])
                if base is None or not r["moves"]:
                    return None
                ours = sum(r["cpu"]["split_ms"].values())
                return (ours - base * r["completed"]) / len(r["moves"])

            rows.append(
                [
                    app,
                    MODE_NAMES[mode],
                    pct(lambda r: r["cpu"]["server_cpus_busy_s"] * 1000 / wall(r)),
                    pct(lambda r: r["cpu"]["split_ms"]["serving"] / wall(r)),
                    pct(lambda r: r["cpu"]["split_ms"]["recipient_start"] / wall(r)),
                    per_move("recipient_take"),
                    per_move("originator_move"),
                    per_move("old_after"),
                    pct(
                        lambda r: (
                            (
                                r["cpu"]["server_cpus_busy_s"] * 1000
                                - sum(r["cpu"]["split_ms"].values())
                            )
                            / wall(r)
                        )
                    ),
                    pct(lambda r: r["cpu"]["driver_s"] * 1000 / wall(r)),
                    cell(
                        [
                            r["cpu"]["split_ms"]["serving"] * 1000 / r["completed"]
                            for r in group
                            if r["completed"]
                        ],
                        1,
                    ),
                    cell([overhead(r) for r in group], 1) if mode != "steady" else "",
                ]
            )
    out += _table(
        [
            "app",
            "run",
            "server CPUs busy %",
            "serving %",
            "recipients started %",
            "recipient take ms / move",
            "originator in move ms / move",
            "old process after ms / move",
            "other on the server CPUs %",
            "benchmark driver % (any CPU)",
            "serving µs / request",
            "overhead per move ms",
        ],
        rows,
    )
    return [*out, ""]


def runnable(data: dict[str, Any]) -> str:
    values = [r["quiet"]["runnable"] for r in data["runs"] if r.get("quiet")]
    return cell(values, 1) if values else "n/a"


def loadavg(data: dict[str, Any]) -> str:
    """The 1-minute load average at the start of the runs: the machine is shared."""
    values = [r["loadavg"][0][0] for r in data["runs"] if r.get("loadavg")]
    return cell(values, 2) + " (median, (min..max))" if values else "n/a"


def loops_line(data: dict[str, Any]) -> str:
    loops = data.get("loops", ["asyncio"])
    names = {
        "asyncio": "asyncio's own",
        "uvloop": "uvloop (the app through `benchmarks/_on_uvloop.py`, the recipients "
        "`_mover.py --loop uvloop`; checked in /proc/PID/maps)",
    }
    text = "; ".join(names[loop] for loop in loops)
    return text + (" — each repeat runs every app on each loop in turn" if len(loops) > 1 else "")


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    out = [
        "# takeover under load: clients while the service moves every "
        f"{data['move_every'] * 1000:.0f} ms",
        "",
        f"Produced by `{data['command']}` on {data['date']} (commit {m.get('commit') or '?'}"
        f"{', src/ modified' if m.get('src_dirty') else ''}), {data['repeats']} repeat(s).",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m.get('memory_mb', '?')} MB RAM",
        f"- Python: {m['python']}",
        f"- Kernel: {m['kernel']}",
        f"- Load average (1 min) at the start of each run: {loadavg(data)}",
        f"- Runnable processes besides the benchmark at the start of each run: {runnable(data)}"
        f" (each run waited up to {data.get('quiet_wait', 0):g} s for fewer than the CPUs)",
        f"- Processes {data.get('pinning', 'not pinned')}",
        f"- Event loop of the servers and recipients: {loops_line(data)}",
        "",
        f"Each repeat, for each app, {len(data.get('modes', MODES))} runs of "
        f"{data['duration']:g} s back to back, the same",
        f"load: {data['connections']} keep-alive connections from one client process",
        "(`benchmarks/_client.py`, selectors), each sending its next request as soon as the",
        "previous one is answered and stopping by itself at the end of the run. Before each",
        f"run, {data.get('warmup', 0):g} s of the same load, checked but not recorded, on the same",
        "connections: a fresh process on this machine serves its first second or two up to",
        "3x slower, which the steady run would otherwise be charged with.",
        *(
            [
                "Every connection is accepted before the run, and the client keeps them open,",
                "idle, until the last move is over: every move carries all of them (one that",
                "carries fewer counts as a failed move).",
            ]
            if data.get("clients_hold")
            else []
        ),
        "",
        "- **steady**: the service stays in the process that started it.",
        f"- **moving**: the service moved every {data['move_every']:g} s (each move once the",
        "  previous one printed its `serving` line), for the whole run: A → B → C → ..., each to a",
        f"  fresh process: {MOVERS[data.get('mover', 'cli')]}. With the library mover, every",
        "  recipient of the run is started (and idle) before the run begins, as a deploy starts",
        "  its new process once: what the clients see is the moves, and the exits of the",
        "  processes the service left.",
        "- **starts only**: a control: recipient processes started at the moves' rate (one every",
        f"  {data['move_every']:g} s, three ahead) and stopped unused, while the service stays:",
        f"  what starting Python {1 / data['move_every']:.3g} times a second on the server's CPU "
        "costs the clients,",
        "  without moving anything.",
        "- **moving + starts**: moving, with the recipients started during the run as in",
        "  *starts only* (three ahead, the next one started at each move): both costs at once.",
        "",
        "Checks: echo answers byte for byte, and a CRC32 and byte count of each direction",
        "of each connection agree at the end; http answers carry the request's own path, and",
        "the hit numbers of all answers are exactly 1..n (the counter moves with the service;",
        "a lost or repeated request would leave a gap or a duplicate); no byte arrives unasked,",
        "also for 100 ms after the end. Latency: from sending a request to its whole answer.",
        "*Client stalls*: turns of the client's loop that took 50 ms longer than their wait",
        "(the client process was not running): a latency spike there is the machine's.",
        "Figures: median over the repeats with (min..max); ratios are between runs of the",
        "same repeat; *moving + starts / starts only* leaves out what starting the processes",
        "costs.",
        "",
        "## Errors and integrity",
        "",
    ]
    rows = []
    for app in variants(data):
        for mode in MODES:
            runs = [r for r in data["runs"] if variant(r) == app and r["mode"] == mode]
            if not runs:
                continue
            moving = mode in ("moving", "moving_starts")
            rows.append(
                [
                    app,
                    MODE_NAMES[mode],
                    cell([len(r["moves"]) for r in runs], 0) if moving else "0",
                    str(sum(r["errors"] for r in runs)),
                    str(sum(lost_or_duplicated(r) for r in runs)),
                    str(sum(len(r["failures"]) for r in runs)),
                    cell([r["completed"] for r in runs], 0),
                    cell([r["throughput_rps"] for r in runs], 0),
                    cell([r["client_cpu_share"] * 100 for r in runs], 0),
                    cell([len(r.get("client_stalls", [])) for r in runs], 0),
                ]
            )
    out += _table(
        [
            "app",
            "run",
            "moves per run",
            "errors (all runs)",
            "bytes or requests lost or duplicated (all runs)",
            "failed moves (all runs)",
            "requests per run",
            "requests/s",
            "client CPU % of one core",
            "client stalls > 50 ms",
        ],
        rows,
    )
    errors = [e for r in data["runs"] for e in r["first_errors"] + r["failures"]]
    if errors:
        out += ["", "First errors:", ""] + [f"- `{e[:300]}`" for e in errors[:10]]

    out += ["", *render_goals(data)]
    out += ["## Latency: moving against steady", ""]
    rows = []
    for app in variants(data):
        both = pairs(data, app)
        starts = pairs(data, app, "starts")
        deploy = pairs(data, app, "moving_starts")
        deploy_starts = pairs(data, app, "moving_starts", "starts")
        if not both:
            continue

        def ratio(runs: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> str:
            return cell([b["latency"][key] / a["latency"][key] for a, b in runs], 2)

        for label, key in (("p50", "p50_ms"), ("p99", "p99_ms"), ("max", "max_ms")):
            rows.append(
                [
                    app,
                    label,
                    cell([s["latency"][key] for s, _ in both]),
                    cell([mv["latency"][key] for _, mv in both]),
                    ratio(both, key),
                    cell([mv["latency_across_pause"][key] for _, mv in both]),
                    cell(
                        [mv["latency_across_pause"][key] / s["latency"][key] for s, mv in both], 2
                    ),
                    cell([st["latency"][key] for _, st in starts]),
                    cell([mv["latency"][key] for _, mv in deploy]),
                    ratio(deploy, key),
                    ratio(deploy_starts, key),
                ]
            )

        def rps(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
            return cell([b["throughput_rps"] / a["throughput_rps"] for a, b in runs], 2)

        rows.append(
            [
                app,
                "requests/s",
                cell([s["throughput_rps"] for s, _ in both], 0),
                cell([mv["throughput_rps"] for _, mv in both], 0),
                rps(both),
                "",
                "",
                cell([st["throughput_rps"] for _, st in starts], 0),
                cell([mv["throughput_rps"] for _, mv in deploy], 0),
                rps(deploy),
                rps(deploy_starts),
            ]
        )
    out += _table(
        [
            "app",
            "latency",
            "steady ms",
            "moving ms (whole run)",
            "moving / steady",
            "requests across a pause, ms",
            "across a pause / steady",
            "starts only ms",
            "moving + starts ms",
            "moving + starts / steady",
            "moving + starts / starts only",
        ],
        rows,
    )
    out += [
        "",
        "*Requests across a pause*: those in flight during some move's pause, the window",
        "taken as [`taken` line read - `pause_ms`, `taken` line read] on the driver's clock.",
        "",
        "## The moves",
        "",
    ]
    rows = []
    for app in variants(data):
        for mode in ("moving", "moving_starts"):
            runs = [run for _, run in pairs(data, app, mode)]
            moves = [mv for run in runs for mv in run["moves"]]
            if not moves:
                continue
            rows.append(
                [
                    app,
                    MODE_NAMES[mode],
                    str(len(moves)),
                    cell([mv["connections"] for mv in moves], 0),
                    cell([mv["pause_ms"] for mv in moves]),
                    cell([(mv["serving"] - mv["start"]) * 1000 for mv in moves], 1),
                    cell([run["latency_across_pause"]["count"] for run in runs], 0),
                ]
            )
    out += _table(
        [
            "app",
            "run",
            "moves (all runs)",
            "connections moved",
            "pause ms",
            "`take` started → serving ms",
            "requests across a pause per run",
        ],
        rows,
    )
    out += [
        "",
        "`take` started → serving: from starting `takeover take` (cli: includes starting Python",
        "and importing takeover) or telling `_mover.py` to go (library), to its `serving` line.",
        "",
        *render_cpu(data),
    ]
    if data.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]] + [""]
    return "\n".join(out)


def write(data: dict[str, Any], directory: str, name: str) -> tuple[str, str]:
    data["goals"] = goals(data)
    json_path = os.path.join(directory, f"{name}.json")
    md_path = os.path.join(directory, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render(data))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="echo,http")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--move-every", type=float, default=0.2, help="seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unrecorded load before each run"
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"runs per app and repeat, of {', '.join(MODES)} (steady and moving at least)",
    )
    parser.add_argument(
        "--mover",
        choices=("library", "cli"),
        default="library",
        help="library: benchmarks/_mover.py, started ahead and told when to take (default); "
        "cli: python -m takeover take --json, started at each move",
    )
    parser.add_argument(
        "--loop",
        default="asyncio",
        help="the event loop(s) of the servers and recipients: asyncio, uvloop, or "
        "asyncio,uvloop (each repeat runs each app on both, side by side)",
    )
    _common.add_run_options(parser, "load")
    args = parser.parse_args(argv)
    if args.render:
        _common.render_only(args.render, write)
        return 0
    _common.raise_nofile()
    apps = [a for a in args.apps.split(",") if a]
    modes = [m for m in MODES if m in args.modes.split(",")]
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown or "steady" not in modes or "moving" not in modes:
        parser.error(f"--modes: steady and moving, and any of {', '.join(MODES[2:])}")
    loops = [loop for loop in LOOPS if loop in args.loop.split(",")]
    if not loops or set(args.loop.split(",")) - set(LOOPS):
        parser.error(f"--loop: any of {', '.join(LOOPS)}, comma-separated")
    if "uvloop" in loops:
        import importlib.util
        import platform

        if importlib.util.find_spec("uvloop") is None:
            parser.error(
                f"--loop uvloop: uvloop is not installed in {sys.executable} "
                f"({platform.python_implementation()}; pip install 'takeover[uvloop]', "
                "CPython only)"
            )
    PIN["server"], PIN["client"] = _common.cpu_split(not args.no_pin)
    data: dict[str, Any] = {
        **_common.run_header("load", args),
        "apps": apps,
        "connections": args.connections,
        "duration": args.duration,
        "move_every": args.move_every,
        "modes": modes,
        "loops": loops,
        "warmup": args.warmup,
        "mover": args.mover,
        "clients_hold": True,
        "pinning": _common.describe_pinning(PIN["server"], PIN["client"]),
        "runs": [],
    }
    for repeat in range(args.repeats):
        for app, loop, mode in [(a, lp, m) for a in apps for lp in loops for m in modes]:
            quiet = _common.wait_quiet(args.quiet_wait)
            run = run_load(
                app,
                mode,
                args.connections,
                args.duration,
                args.move_every,
                args.mover,
                args.warmup,
                loop,
            )
            run["repeat"] = repeat
            run["quiet"] = quiet
            data["runs"].append(run)
            lat = run["latency"]
            split = run["cpu"]["split_ms"]
            print(
                f"{variant(run)} {MODE_NAMES[mode]} {repeat + 1}/{args.repeats}: "
                f"{run['completed']} requests, {run['errors']} errors, "
                f"{len(run['moves'])} moves, p50 {lat['p50_ms']:.3f} p99 {lat['p99_ms']:.3f} "
                f"max {lat['max_ms']:.3f} ms; server CPU ms: "
                + ", ".join(f"{k} {v:.0f}" for k, v in split.items() if v >= 0.5),
                file=sys.stderr,
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
