"""1,000 WebSocket clients (the `websockets` library) while their server moves, all at once.

    python benchmarks/websocket.py [--connections 1000] [--clients 4] [--interval 0.2]
        [--duration 10] [--warmup 2] [--move-every 1.5] [--repeats 3]
        [--compression deflate,none] [--out DIR] [--name websocket]

The server is ``_ws_app.py``: an echo on ``takeover.websocket`` (each text
message answered ``PID COUNT TEXT``). The load is ``_ws_client.py``:
``--clients`` processes sharing ``--connections`` WebSocket connections
(``websockets.asyncio.client.connect``, its defaults: permessage-deflate
offered), each connection sending ``ID SEQ SENT`` every ``--interval`` s,
spread evenly over the interval, and checking that every reply comes once,
in order, with the server's count of that connection's messages right.

For each repeat and each ``--compression`` (``deflate``: the client's default
offer; ``none``: ``compression=None``), two runs of the same length back to
back, each on a fresh server and fresh connections: **steady** (the service
stays in the process that started it) and **moving** (the service, with all
its connections, moved every ``--move-every`` s into a recipient started
before the run, ``_mover.py``, which does what ``takeover take --json`` does
through the library API). Every connection is open and accepted before the
run and stays open, idle, until the last move is over, so every move carries
all of them: one that carries fewer is a failed move.

Writes ``DIR/NAME.json`` and ``DIR/NAME.md``; ``--render NAME.json`` redraws
the markdown. Exits 1 if a message was lost, repeated, reordered or wrong, a
connection closed or failed, a move failed or carried fewer connections, or a
server process printed a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from harness.procs import PYTHON, ExpectError, Proc

APP = os.path.join(_common.HERE, "_ws_app.py")
CLIENT = os.path.join(_common.HERE, "_ws_client.py")
MOVER = os.path.join(_common.HERE, "_mover.py")
TIMEOUT = 60.0
PHASES = ("steady", "moving")
COMPRESSIONS = ("deflate", "deflate-full", "none")
PIN: dict[str, list[int]] = {"server": [], "client": []}
"""CPUs for the servers and for the clients (``--no-pin``: none)."""
"""Width of the time bins of the latency series."""
SERVER_TROUBLE = ("Traceback", "Exception in callback", "Error", "exception")
"""What a server process must not print (asyncio logs a callback's exception)."""
COUNTS = ("lost", "duplicates", "out_of_order", "wrong", "closes", "errors")


def latency_stats(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "p999_ms": percentile(ordered, 99.9) * 1000,
        "max_ms": (ordered[-1] if ordered else float("nan")) * 1000,
    }


def server_trouble(proc: Proc) -> list[str]:
    """The lines of a server process's output that say something went wrong."""
    return [
        line
        for line in proc.output().splitlines()
        if not line.startswith("{") and any(word in line for word in SERVER_TROUBLE)
    ]


def stop_spare(proc: Proc) -> None:
    """A recipient not used: told to stop (it exits 0 on any line but ``go``), else killed."""
    try:
        proc.send_line("stop")
        proc.wait(10)
    except Exception:
        pass
    proc.kill()


def run_phase(args: argparse.Namespace, phase: str, compression: str) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="tkws", dir="/tmp")
    control = os.path.join(workdir, "c.sock")
    holders: list[Proc] = []
    clients: list[Proc] = []
    spares: list[Proc] = []
    moves: list[dict[str, Any]] = []
    failures: list[str] = []
    trouble: list[str] = []
    n = args.connections
    k = min(args.clients, n)
    shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
    try:
        server = Proc([PYTHON, APP, "--control", control], cpus=PIN["server"])
        holders.append(server)
        port = int(server.event("ready", TIMEOUT)["port"])
        first = 0
        for i, share in enumerate(shares):
            argv = [PYTHON, CLIENT, "--port", str(port), "--connections", str(share)]
            argv += ["--first-id", str(first), "--total", str(n)]
            argv += ["--interval", str(args.interval), "--warmup", str(args.warmup)]
            argv += ["--duration", str(args.duration), "--settle", str(args.settle)]
            argv += ["--samples", os.path.join(workdir, f"samples-{i}.bin")]
            argv += ["--compression", "none" if compression == "none" else "deflate"]
            if compression == "deflate-full":
                argv += ["--fill", str(args.fill)]
            clients.append(Proc(argv, stdin=True, cpus=PIN["client"]))
            first += share
        connected = [c.event("connected", TIMEOUT) for c in clients]
        opened = sum(int(c["opened"]) for c in connected)
        extensions: dict[str, int] = {}
        for c in connected:
            for value, count in c["extensions"].items():
                extensions[value] = extensions.get(value, 0) + int(count)
        if opened != n:
            problems = [p for c in connected for p in c["problems"]]
            raise ExpectError(f"{opened} of {n} connections opened: {problems[:5]}")
        # Accepted (and upgraded) before the run, kept until the moves are over:
        # every move carries every connection.
        _common.wait_connections(control, n, TIMEOUT)
        if phase == "moving":
            count = max(0, math.ceil(args.duration / args.move_every) - 1) + 1
            spares = [
                Proc([PYTHON, MOVER, control], stdin=True, cpus=PIN["server"]) for _ in range(count)
            ]
            for proc in spares:
                proc.event("ready", TIMEOUT)
        load_before = os.getloadavg()
        start = time.monotonic() + 0.5
        for proc in clients:
            proc.send_line(f"go {start!r}")
        t0 = start + args.warmup  # the measured window: [t0, t0 + duration)
        if phase == "moving":
            tick = 1
            while t0 + tick * args.move_every < t0 + args.duration - 1e-9:
                due = t0 + tick * args.move_every
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)  # the schedule of the moves: what is measured
                if spares:
                    proc = spares.pop(0)  # started and ready before the run
                else:  # the run outlasts the recipients started for it
                    proc = Proc([PYTHON, MOVER, control], stdin=True, cpus=PIN["server"])
                    proc.event("ready", TIMEOUT)
                holders.append(proc)
                try:
                    began = time.monotonic()
                    proc.send_line("go")
                    taken = proc.event("taken", TIMEOUT)
                    taken_at = time.monotonic()
                    proc.event("serving", TIMEOUT)
                except ExpectError as exc:  # the move failed: the service stays where it was
                    failures.append(str(exc)[:2000])
                    holders.remove(proc)
                    spares.append(proc)  # stopped with the recipients not used
                    break
                if taken["connections"] != n:
                    failures.append(
                        f"move at {began - t0:.3f} s carried {taken['connections']} of {n}"
                    )
                moves.append(
                    {
                        "start": began - t0,
                        "taken": taken_at - t0,
                        "serving": time.monotonic() - t0,
                        "pause_ms": taken["pause_ms"],
                        "connections": taken["connections"],
                        "graph_bytes": taken.get("graph_bytes"),
                        "pid": proc.pid,
                    }
                )
                tick = max(tick + 1, int((time.monotonic() - t0) / args.move_every) + 1)
        for proc in spares:
            stop_spare(proc)
        spares = []
        wait = args.warmup + args.duration + args.settle + TIMEOUT
        done = [c.event("done", wait) for c in clients]
        for proc in clients:
            proc.send_line("close")  # the moves are over: the connections may go
        closed = [c.event("closed", TIMEOUT) for c in clients]
        exits = [c.wait(TIMEOUT) for c in clients]
        if any(exits):
            failures.append(f"client processes exited with {exits}")
        last = holders[-1]
        last.signal(signal.SIGTERM)
        last.wait(TIMEOUT)
        left = []
        for proc in holders[:-1]:
            try:
                left.append(proc.wait(TIMEOUT))
            except Exception as exc:  # a holder that never left
                failures.append(f"{proc.argv[1:]}: {exc}")
        bad = [rc for rc in left if rc != 0]
        if bad:
            failures.append(f"{len(bad)} process(es) the service left exited with {bad}")
        for proc in holders:
            trouble += [
                f"{os.path.basename(proc.argv[1])} {proc.pid}: {line}"
                for line in server_trouble(proc)
            ]
        samples = [
            s for i in range(k) for s in read_samples(os.path.join(workdir, f"samples-{i}.bin"))
        ]
    finally:
        for proc in [*holders, *clients, *spares]:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    totals = {
        key: sum(int(d[key]) for d in done) for key in ("sent", "answered", "measured", *COUNTS)
    }
    totals["unclean_closes"] = sum(int(c["unclean"]) for c in closed)
    latencies = [latency for _sent, latency in samples]
    # The messages in flight during some move's pause: the window taken as
    # [`taken` line read - pause_ms, `taken` line read] on the driver's clock.
    in_pause: list[float] = []
    for move in moves:
        b = t0 + move["taken"]
        a = b - move["pause_ms"] / 1000
        move_latencies = [lat for sent, lat in samples if sent <= b and sent + lat >= a]
        move["across_pause"] = latency_stats(move_latencies)
        in_pause += move_latencies
    pids = [d["pids_per_connection"] for d in done]
    wall = max(float(d["wall_s"]) for d in done)
    return {
        "phase": phase,
        "compression": compression,
        "connections": n,
        "clients": k,
        "extensions": extensions,
        **totals,
        "close_codes": [d["close_codes"] for d in done if d["close_codes"]],
        "pids_per_connection": [min(p[0] for p in pids), max(p[1] for p in pids)],
        "client_cpu_s": sum(float(d["cpu_s"]) for d in done),
        "client_wall_s": wall,
        "send_lag_max_ms": max(float(d["send_lag_max_ms"]) for d in done),
        "late_sends": sum(int(d["late_sends"]) for d in done),
        "client_stalls": [s for d in done for s in d["stalls"]],
        "problems": [p for d in done for p in d["problems"]]
        + [p for c in closed for p in c["problems"]],
        "latency": latency_stats(latencies),
        "latency_across_pause": latency_stats(in_pause),
        "moves": moves,
        "failures": failures,
        "server_trouble": trouble[:50],
        "loadavg": [load_before, os.getloadavg()],
        "series": series(samples, t0, args.duration),
    }


def bad_run(run: dict[str, Any]) -> int:
    """How many things went wrong in a run (0: a clean run)."""
    return (
        sum(int(run[key]) for key in COUNTS)
        + int(run["unclean_closes"])
        + len(run["failures"])
        + len(run["server_trouble"])
        + int(run["sent"] != run["answered"])
    )


# -- the report ----------------------------------------------------------------


def cell(values: Sequence[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    median = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def runs_of(data: dict[str, Any], compression: str, phase: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["compression"] == compression and r["phase"] == phase]


def pairs(data: dict[str, Any], compression: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(steady, moving) runs with one compression from the same repeat."""
    steady = {r["repeat"]: r for r in runs_of(data, compression, "steady")}
    return [
        (steady[r["repeat"]], r)
        for r in runs_of(data, compression, "moving")
        if r["repeat"] in steady
    ]


def loadavg(data: dict[str, Any]) -> str:
    values = [r["loadavg"][0][0] for r in data["runs"] if r.get("loadavg")]
    return cell(values, 2) + " (median, (min..max))" if values else "n/a"


def runnable(data: dict[str, Any]) -> str:
    values = [r["quiet"]["runnable"] for r in data["runs"] if r.get("quiet")]
    return cell(values, 1) if values else "n/a"


COMPRESSION_NAMES = {
    "deflate": "permessage-deflate offered (the client's default), the windows filling with "
    "the run's small messages",
    "deflate-full": "the same, after a first message of {fill:,} bytes of random text each way "
    "on every connection: both windows full (32 KiB), as on a connection that has carried "
    "32 KiB each way",
    "none": "`compression=None`, nothing offered",
}


def negotiated(runs: list[dict[str, Any]]) -> str:
    """What the server agreed to, over the connections of the runs."""
    total: dict[str, int] = {}
    for run in runs:
        for value, count in run["extensions"].items():
            total[value] = total.get(value, 0) + int(count)
    return "; ".join(f"`{v}`: {c}" if v else f"none: {c}" for v, c in sorted(total.items()))


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    rate = 1 / data["interval"]
    per_s = data["connections"] * rate
    out = [
        f"# takeover.websocket: {data['connections']:,} WebSocket clients while the server "
        f"moves every {data['move_every']:g} s",
        "",
        f"Produced by `{data['command']}` on {data['date']} (commit {m.get('commit') or '?'}"
        f"{', src/ modified' if m.get('src_dirty') else ''}), {data['repeats']} repeat(s).",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m.get('memory_mb', '?')} MB RAM",
        f"- Python: {m['python']}; websockets {data.get('websockets', '?')} (the clients), "
        f"wsproto {data.get('wsproto', '?')} and h11 {data.get('h11', '?')} (the server)",
        f"- Kernel: {m['kernel']}",
        f"- Load average (1 min) at the start of each run: {loadavg(data)}",
        f"- Runnable processes besides the benchmark at the start of each run: {runnable(data)}"
        f" (each run waited up to {data.get('quiet_wait', 0):g} s for fewer than the CPUs)",
        f"- Processes {data.get('pinning', 'not pinned')}",
        "",
        "The server: `benchmarks/_ws_app.py`, an echo on `takeover.websocket` (each text",
        "message answered `PID COUNT TEXT`: the pid of the process that answered, and the",
        "connection's count of messages, an attribute of its protocol that moves with it).",
        f"The load: {data['connections']:,} WebSocket connections from {data['clients']} client",
        "processes (`benchmarks/_ws_client.py`, `websockets.asyncio.client.connect` with its",
        "defaults, one asyncio loop each), every connection sending a text message",
        f"`ID SEQ SENT` every {data['interval'] * 1000:g} ms ({per_s:,.0f} messages/s in all),",
        "the connections spread evenly over the interval. Latency: from the send (`SENT`, the",
        "monotonic clock) to the reply's arrival. Every reply is checked: the next SEQ of its",
        "connection (in order, each once), with the server's COUNT = SEQ + 1; a message",
        f"never answered (within {data['settle']:g} s of the end) is lost. Before each run,",
        f"{data['warmup']:g} s of the same load, checked but not measured.",
        "",
        f"Each repeat, for each compression setting, two {data['duration']:g} s runs back to",
        "back, each with a fresh server and fresh connections:",
        "",
        "- **steady**: the service stays in the process that started it;",
        f"- **moving**: the service moved every {data['move_every']:g} s, with all",
        f"  {data['connections']:,} connections in one move, A → B → C → ..., each into a fresh",
        "  process: `benchmarks/_mover.py` (what `takeover take --json` does, through the",
        "  library API), every one of them started, and idle, before the run. Every connection",
        "  is open and accepted before the run and stays open until the last move is over:",
        "  a move that carries fewer than all of them is a failed move.",
        "",
        "Compression, as the client asks:",
        "",
        *(
            f"- `{c}`: {COMPRESSION_NAMES[c].format(fill=data.get('fill', 0))};"
            for c in data["compressions"]
        ),
        "",
        "the server (`takeover.websocket`) accepts permessage-deflate when offered, and its",
        "zlib windows (the last 32 KiB each way per connection) move with the connection.",
        "Figures: median over the repeats with (min..max); ratios between the runs of the",
        "same repeat.",
        "",
        "## Integrity",
        "",
    ]
    rows = []
    for comp in data["compressions"]:
        for phase in PHASES:
            runs = runs_of(data, comp, phase)
            if not runs:
                continue
            rows.append(
                [
                    comp,
                    phase,
                    str(len(runs)),
                    cell([len(r["moves"]) for r in runs], 0) if phase == "moving" else "0",
                    cell([r["measured"] for r in runs], 0),
                    str(sum(r["sent"] for r in runs)),
                    str(sum(r["lost"] for r in runs)),
                    str(sum(r["duplicates"] for r in runs)),
                    str(sum(r["out_of_order"] + r["wrong"] for r in runs)),
                    str(sum(r["closes"] + r["unclean_closes"] for r in runs)),
                    str(sum(r["errors"] for r in runs)),
                    str(sum(len(r["failures"]) for r in runs)),
                    str(sum(len(r["server_trouble"]) for r in runs)),
                    cell([r["pids_per_connection"][0] for r in runs], 0),
                    negotiated(runs),
                ]
            )
    out += _table(
        [
            "compression",
            "run",
            "runs",
            "moves per run",
            "messages measured per run",
            "messages sent (all runs, with warm-up)",
            "lost",
            "duplicated",
            "out of order or wrong",
            "connections closed",
            "client errors",
            "failed moves",
            "server tracebacks",
            "processes that answered each connection (fewest)",
            "permessage-deflate agreed (connections, all runs)",
        ],
        rows,
    )
    out += [
        "",
        "*Connections closed*: ended by anything but the clients' own close after the run, plus",
        "closing handshakes at the end that did not finish with 1000. *Processes that answered",
        "each connection*: the fewest distinct pids in the replies of any one connection: in",
        "the moving runs, moves + 1 says that every connection was answered by every process.",
    ]
    problems = [
        p for r in data["runs"] for p in r["failures"] + r["server_trouble"] + r["problems"]
    ]
    if data.get("aborted"):
        problems.insert(0, "the benchmark stopped: " + data["aborted"])
    if problems:
        out += ["", "First problems:", ""] + [f"- `{p[:300]}`" for p in problems[:15]]

    out += ["", "## Latency: moving against steady", ""]
    rows = []
    for comp in data["compressions"]:
        both = pairs(data, comp)
        if not both:
            continue
        for label, key in (
            ("p50", "p50_ms"),
            ("p99", "p99_ms"),
            ("p99.9", "p999_ms"),
            ("max", "max_ms"),
        ):
            rows.append(
                [
                    comp,
                    label,
                    cell([s["latency"][key] for s, _ in both]),
                    cell([mv["latency"][key] for _, mv in both]),
                    cell([mv["latency"][key] / s["latency"][key] for s, mv in both], 2),
                    cell([mv["latency_across_pause"][key] for _, mv in both]),
                    cell(
                        [mv["latency_across_pause"][key] / s["latency"][key] for s, mv in both], 2
                    ),
                ]
            )
    out += _table(
        [
            "compression",
            "latency",
            "steady ms",
            "moving ms (whole run)",
            "moving / steady",
            "messages across a pause, ms",
            "across a pause / steady",
        ],
        rows,
    )
    out += [
        "",
        "*Messages across a pause*: those in flight during some move's pause (sent before its",
        "end, answered after its start), the pause taken as [`taken` line read - `pause_ms`,",
        "`taken` line read] on the driver's clock.",
        "",
        "## The moves",
        "",
    ]
    rows = []
    for comp in data["compressions"]:
        runs = [mv for _, mv in pairs(data, comp)]
        moves = [m for r in runs for m in r["moves"]]
        if not moves:
            continue
        rows.append(
            [
                comp,
                str(len(moves)),
                cell([m["connections"] for m in moves], 0),
                cell([m["pause_ms"] for m in moves], 2),
                cell([m["graph_bytes"] / 1024 for m in moves if m.get("graph_bytes")], 0),
                cell([(m["serving"] - m["start"]) * 1000 for m in moves], 1),
                cell([m["across_pause"]["count"] for m in moves], 0),
                cell([m["across_pause"]["max_ms"] for m in moves], 2),
            ]
        )
    out += _table(
        [
            "compression",
            "moves (all runs)",
            "connections moved",
            "pause ms (`pause_ms`)",
            "graph KiB",
            "`go` → serving ms",
            "messages across the pause",
            "worst latency across the pause ms",
        ],
        rows,
    )
    out += [
        "",
        "`pause_ms` is the library's own figure (the originator's quiesce to the recipient's",
        "start, on the shared monotonic clock), as `takeover take --json` prints it. `go` →",
        "serving: from telling the recipient to take to its `serving` line.",
        "",
        "By move, in order (the same move of every repeat): with context takeover, each",
        "connection's deflate windows grow with every message until they hold 32 KiB each way,",
        "and the graph with them.",
        "",
    ]
    header = ["move", "at s"]
    columns = []
    for comp in data["compressions"]:
        runs = [mv for _, mv in pairs(data, comp)]
        if any(r["moves"] for r in runs):
            header += [f"{comp}: pause ms", f"{comp}: graph KiB"]
            columns.append(runs)
    most = max((len(r["moves"]) for runs in columns for r in runs), default=0)
    rows = []
    for i in range(most):
        row = [str(i + 1), f"{(i + 1) * data['move_every']:g}"]
        for runs in columns:
            moves = [r["moves"][i] for r in runs if len(r["moves"]) > i]
            row.append(cell([m["pause_ms"] for m in moves], 2))
            row.append(cell([m["graph_bytes"] / 1024 for m in moves if m.get("graph_bytes")], 0))
        rows.append(row)
    if rows:
        out += _table(header, rows)
    out += ["", "## The clients", ""]
    rows = []
    for comp in data["compressions"]:
        for phase in PHASES:
            runs = runs_of(data, comp, phase)
            if not runs:
                continue
            rows.append(
                [
                    comp,
                    phase,
                    cell([r["client_cpu_s"] / r["client_wall_s"] * 100 for r in runs], 0),
                    cell([r["send_lag_max_ms"] for r in runs], 1),
                    str(sum(r["late_sends"] for r in runs)),
                    cell([len(r["client_stalls"]) for r in runs], 0),
                ]
            )
    out += _table(
        [
            "compression",
            "run",
            "client CPU, % of one core (all client processes)",
            "latest send ms (after its time)",
            "sends an interval late (all runs)",
            "client stalls > 50 ms",
        ],
        rows,
    )
    out += [
        "",
        "A send late or a stall of the clients' loop is time the client processes did not run",
        "(or were busy): a latency spike there is the clients', not the server's.",
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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("websockets", "wsproto", "h11"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "?"
    return found


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the `finally`s stop every process started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--interval", type=float, default=0.2, help="seconds between a connection's messages"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run")
    parser.add_argument("--move-every", type=float, default=1.5, help="seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait for replies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compression",
        default="deflate",
        help="deflate (the client's default offer), deflate-full (the same, windows filled "
        "first), none (compression=None), or several: deflate,deflate-full,none",
    )
    parser.add_argument(
        "--fill",
        type=int,
        default=32768,
        help="deflate-full: bytes of the first message of each connection, each way",
    )
    _common.add_run_options(parser, "websocket")
    args = parser.parse_args(argv)
    if args.render:
        _common.render_only(args.render, write)
        return 0
    compressions = [c for c in COMPRESSIONS if c in args.compression.split(",")]
    if not compressions or set(args.compression.split(",")) - set(COMPRESSIONS):
        parser.error(f"--compression: any of {', '.join(COMPRESSIONS)}")
    signal.signal(signal.SIGTERM, _terminated)
    _common.raise_nofile()
    PIN["server"], PIN["client"] = _common.cpu_split(not args.no_pin)
    data: dict[str, Any] = {
        **_common.run_header("websocket", args),
        **_versions(),
        "connections": args.connections,
        "clients": min(args.clients, args.connections),
        "interval": args.interval,
        "duration": args.duration,
        "warmup": args.warmup,
        "move_every": args.move_every,
        "settle": args.settle,
        "compressions": compressions,
        "fill": args.fill,
        "pinning": _common.describe_pinning(PIN["server"], PIN["client"]),
        "runs": [],
    }
    failed = 0
    schedule = [(r, c, p) for r in range(args.repeats) for c in compressions for p in PHASES]
    for repeat, compression, phase in schedule:
        quiet = _common.wait_quiet(args.quiet_wait)
        try:
            run = run_phase(args, phase, compression)
        except ExpectError as exc:  # a process that did not do its part: no figures
            data["aborted"] = f"{compression} {phase} {repeat + 1}: {str(exc)[:3000]}"
            print(f"ABORTED: {data['aborted']}", file=sys.stderr, flush=True)
            failed += 1
            break
        run["repeat"] = repeat
        run["quiet"] = quiet
        data["runs"].append(run)
        failed += bad_run(run)
        lat = run["latency"]
        pauses = ", ".join(f"{m['pause_ms']:.1f}" for m in run["moves"])
        print(
            f"{compression} {phase} {repeat + 1}/{args.repeats}: "
            f"{run['measured']} messages, lost {run['lost']}, duplicated "
            f"{run['duplicates']}, closes {run['closes']}, p50 {lat['p50_ms']:.2f} "
            f"p99 {lat['p99_ms']:.2f} max {lat['max_ms']:.2f} ms"
            + (f"; pauses ms: {pauses}" if pauses else ""),
            file=sys.stderr,
            flush=True,
        )
        for problem in (run["failures"] + run["server_trouble"] + run["problems"])[:5]:
            print(f"  {problem[:500]}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = write(data, args.out, args.name)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    if failed:
        print(f"FAILED: {failed} problem(s): see {md_path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
