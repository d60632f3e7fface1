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


def take_argv(control: str) -> list[str]:
    return [PYTHON, "-m", "takeover", "take", "--json", control]


def start_app(app: str, port: int, control: str) -> Proc:
    script = {"echo": "echo.py", "http": "http_counter.py"}[app]
    argv = [PYTHON, os.path.join(EXAMPLES, script)]
    proc = Proc([*argv, "--port", str(port), "--control", control], cpus=PIN["server"])
    proc.expect("^" + re.escape(f"{app} on "), TIMEOUT)
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


def mover_argv(control: str) -> list[str]:
    return [PYTHON, os.path.join(_common.HERE, "_mover.py"), control]


def spare(control: str) -> Proc:
    """A recipient started ahead (``_mover.py``), waiting to be told to take."""
    return Proc(mover_argv(control), stdin=True, cpus=PIN["server"])


def run_load(
    app: str,
    mode: str,
    connections: int,
    duration: float,
    move_every: float,
    mover: str = "library",
    warmup: float = 0.0,
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
    try:
        port = free_port()
        holders.append(start_app(app, port, control))
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
            spares = [spare(control) for _ in range(SPARES)]
        elif moving and mover != "cli":
            # moving: every recipient of the run is started before it begins.
            spares = [spare(control) for _ in range(int(duration / move_every) + 1)]
        for proc in spares:
            proc.event("ready", TIMEOUT)
            ready.add(proc.pid)
        load_before = os.getloadavg()
        client.send_line("go")
        t0 = float(client.event("started", TIMEOUT)["t0"])
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
                    if proc.pid not in ready:
                        proc.event("ready", TIMEOUT)
                    proc.kill()
                    spares.append(spare(control))
                    k = max(k + 1, int((time.monotonic() - t0) / move_every) + 1)
                    continue
                try:
                    if mover == "cli":
                        start = time.monotonic()
                        proc = Proc(take_argv(control), cpus=PIN["server"])
                        holders.append(proc)
                    else:
                        # (Started here only if the run outlasts the recipients
                        # started for it.)
                        proc = spares.pop(0) if spares else spare(control)
                        holders.append(proc)
                        if proc.pid not in ready:
                            proc.event("ready", TIMEOUT)
                        start = time.monotonic()
                        proc.send_line("go")
                    taken = proc.event("taken", TIMEOUT)
                    taken_at = time.monotonic()
                    proc.event("serving", TIMEOUT)
                except ExpectError as exc:
                    failures.append(str(exc))
                    break
                if taken["connections"] != connections:
                    failures.append(
                        f"move at {start - t0:.3f} s carried {taken['connections']} of "
                        f"{connections} connections"
                    )
                if replenish:
                    spares.append(spare(control))
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
            proc.kill()
        done = client.event("done", duration + TIMEOUT)
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
    runs = [r for r in data["runs"] if r["app"] == app]
    first = {r["repeat"]: r for r in runs if r["mode"] == base}
    second = [r for r in runs if r["mode"] == mode and r["repeat"] in first]
    return [(first[r["repeat"]], r) for r in second]


def runnable(data: dict[str, Any]) -> str:
    values = [r["quiet"]["runnable"] for r in data["runs"] if r.get("quiet")]
    return cell(values, 1) if values else "n/a"


def loadavg(data: dict[str, Any]) -> str:
    """The 1-minute load average at the start of the runs: the machine is shared."""
    values = [r["loadavg"][0][0] for r in data["runs"] if r.get("loadavg")]
    return cell(values, 2) + " (median, (min..max))" if values else "n/a"


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
        "  what starting Python five times a second on the server's CPU costs the clients,",
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
    for app in data["apps"]:
        for mode in MODES:
            runs = [r for r in data["runs"] if r["app"] == app and r["mode"] == mode]
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

    out += ["", "## Latency: moving against steady", ""]
    rows = []
    for app in data["apps"]:
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
    for app in data["apps"]:
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
    ]
    if data.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]] + [""]
    return "\n".join(out)


def write(data: dict[str, Any], directory: str, name: str) -> tuple[str, str]:
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
    PIN["server"], PIN["client"] = _common.cpu_split(not args.no_pin)
    data: dict[str, Any] = {
        **_common.run_header("load", args),
        "apps": apps,
        "connections": args.connections,
        "duration": args.duration,
        "move_every": args.move_every,
        "modes": modes,
        "warmup": args.warmup,
        "mover": args.mover,
        "clients_hold": True,
        "pinning": _common.describe_pinning(PIN["server"], PIN["client"]),
        "runs": [],
    }
    for repeat in range(args.repeats):
        for app in apps:
            for mode in modes:
                quiet = _common.wait_quiet(args.quiet_wait)
                run = run_load(
                    app,
                    mode,
                    args.connections,
                    args.duration,
                    args.move_every,
                    args.mover,
                    args.warmup,
                )
                run["repeat"] = repeat
                run["quiet"] = quiet
                data["runs"].append(run)
                lat = run["latency"]
                print(
                    f"{app} {run['mode']} {repeat + 1}/{args.repeats}: "
                    f"{run['completed']} requests, {run['errors']} errors, "
                    f"{len(run['moves'])} moves, p50 {lat['p50_ms']:.3f} p99 {lat['p99_ms']:.3f} "
                    f"max {lat['max_ms']:.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
