"""Turn the runs of scale.py into a markdown report.

    python benchmarks/report.py benchmarks/results/scale.json   # rewrites scale.md

Every figure is the median over the runs of a size, with (min..max) after it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]

# The pause, cut at the phase boundaries both processes recorded on the shared
# monotonic clock: (label, process of the start mark, start, process, end).
PHASES: list[tuple[str, str, str, str, str]] = [
    ("quiesce (originator)", "o", "quiesce_start", "o", "quiesce_end"),
    ("pickle (originator)", "o", "quiesce_end", "o", "dumps_end"),
    ("graph frame sent + received", "o", "dumps_end", "r", "graph_received"),
    ("fds after the graph, if any", "r", "graph_received", "r", "loads_start"),
    ("unpickle (recipient)", "r", "loads_start", "r", "loads_end"),
    ("adopt", "r", "loads_end", "r", "adopt_end"),
    ("commit (arbiter)", "r", "adopt_end", "r", "start_start"),
    ("start", "r", "start_start", "r", "start_end"),
]
OUTSIDE: list[tuple[str, str, str, str, str]] = [
    ("TAKE -> quiesce (dry run, sockets sent ahead)", "o", "take_received", "o", "quiesce_start"),
    ("sockets ahead ready -> graph received", "r", "ahead_ready", "r", "graph_received"),
    ("COMMITTED sent (after start) -> received", "r", "start_end", "o", "committed_received"),
    ("release (originator, after commit)", "o", "release_start", "o", "release_end"),
]
DRY_RUN = ("dry run", "o", "dry_run_start", "o", "dry_run_end")

RECIPIENTS = {
    "library": "`benchmarks/_recipient.py`, the library API timed from inside",
    "cli": "`python -m takeover take --json`; take, phases and memory before it are n/a",
}


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def cell(values: Sequence[float | None], digits: int = 3, scale: float = 1.0) -> str:
    """``median (min..max)`` of the values that are there; ``n/a`` if none is."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    median, low, high = stats([v * scale for v in values])
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"


def _floor_ms(floor: Row) -> float:
    """The floor with the application's objects alone (bare protocols)."""
    return float(floor["fds_ms"] + floor["dumps_ms"] + floor["loads_ms"])


def _graph_floor_ms(floor: Row) -> float | None:
    """The floor with the same graph (None in results from before it was measured)."""
    if "graph_dumps_ms" not in floor:
        return None
    return float(floor["fds_ms"] + floor["graph_dumps_ms"] + floor["graph_loads_ms"])


def _ratios(numerators: Sequence[float | None], floors: Sequence[float | None]) -> list[float]:
    return [n / f for n, f in zip(numerators, floors) if n is not None and f]


def _mark(run: Row, side: str, name: str) -> float | None:
    marks = run["originator_marks"] if side == "o" else run["recipient_marks"]
    value = marks.get(name)
    return float(value) if value is not None else None


def _phase(run: Row, phase: tuple[str, str, str, str, str]) -> float | None:
    _label, side_a, start, side_b, end = phase
    a, b = _mark(run, side_a, start), _mark(run, side_b, end)
    if a is None or b is None:
        return None
    return (b - a) * 1000


def gaps_near(gaps: Sequence[Sequence[float]], marks: Row) -> list[list[float]]:
    """The heartbeat gaps (``[start, gap]``, s) of a process that end after 0.5 s
    before TAKE and start before 0.5 s after the release (all if a mark is missing)."""
    lo, hi = marks.get("take_received"), marks.get("release_end")
    if lo is None or hi is None:
        return [list(g) for g in gaps]
    return [list(g) for g in gaps if g[0] + g[1] > lo - 0.5 and g[0] < hi + 0.5]


def _worst_gap(gaps: Sequence[Sequence[float]], lo: float, hi: float) -> float:
    """The longest gap (ms) that overlaps [lo, hi]; 0 if none (every turn was short)."""
    return max((g[1] * 1000 for g in gaps if g[0] < hi and g[0] + g[1] > lo), default=0.0)


def stalls(run: Row) -> dict[str, float | None]:
    """The longest event-loop stalls (ms) of a run, from its heartbeat gaps:

    - ``originator``: TAKE received to the release's end; ``originator_before``:
      of those, the ones over before the quiesce started (the dry run...);
    - ``recipient``: its start (connect) to the service started;
      ``recipient_before``: over before the originator's quiesce started.

    None where the run has no gaps recorded (results from before they were)."""
    om, rm = run["originator_marks"], run.get("recipient_marks", {})
    result: dict[str, float | None] = dict.fromkeys(
        ("originator", "originator_before", "recipient", "recipient_before")
    )
    take, quiesce, release = (om.get(k) for k in ("take_received", "quiesce_start", "release_end"))
    if "originator_gaps" in run and None not in (take, quiesce, release):
        gaps = run["originator_gaps"]
        result["originator"] = _worst_gap(gaps, take, release)
        result["originator_before"] = _worst_gap(
            [g for g in gaps if g[0] + g[1] <= quiesce], take, quiesce
        )
    started, serving = run.get("recipient_started"), rm.get("start_end")
    if run.get("recipient_gaps") is not None and None not in (started, serving, quiesce):
        gaps = run["recipient_gaps"]
        result["recipient"] = _worst_gap(gaps, started, serving)
        result["recipient_before"] = _worst_gap(
            [g for g in gaps if g[0] + g[1] <= quiesce], started, quiesce
        )
    return result


def probe_summary(samples: Sequence[Sequence[float]], marks: Row) -> Row:
    """The probes' echo latencies (``[due, answered]`` pairs, s) summed up around the
    move: the window is TAKE received to the release's end (originator's marks);
    a line is in it if it was answered after the window opened and due before it
    closed. Latencies in ms."""
    lo, quiesce, hi = (marks.get(k) for k in ("take_received", "quiesce_start", "release_end"))
    inside: list[tuple[float, float]] = []
    outside: list[float] = []
    for due, answered in samples:
        latency = (answered - due) * 1000
        if lo is not None and hi is not None and answered > lo and due < hi:
            inside.append((due, latency))
        else:
            outside.append(latency)
    before = [lat for due, lat in inside if quiesce is not None and due + lat / 1000 <= quiesce]
    worst = sorted(inside, key=lambda s: -s[1])[:5]
    return {
        "lines": len(samples),
        "lines_in_move": len(inside),
        "worst_ms": max((lat for _due, lat in inside), default=None),
        "worst_before_pause_ms": max(before, default=None),
        "worst_outside_ms": max(outside, default=None),
        "median_outside_ms": statistics.median(outside) if outside else None,
        # The five worst lines of the move: when each was due, ms after the quiesce started.
        "worst_lines": [
            [round((due - quiesce) * 1000, 3) if quiesce is not None else None, round(lat, 3)]
            for due, lat in worst
        ],
    }


def stall_line(run: Row) -> str:
    """One line of a run's stalls and worst probe latency, for the driver's progress."""
    st = stalls(run)
    probe = run.get("probe") or {}

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return (
        f"stall originator {ms(st['originator'])} (before quiesce {ms(st['originator_before'])}), "
        f"recipient {ms(st['recipient'])} (before {ms(st['recipient_before'])}) ms; "
        f"worst probe {ms(probe.get('worst_ms'))} ms "
        f"(before quiesce {ms(probe.get('worst_before_pause_ms'))}, "
        f"outside the move {ms(probe.get('worst_outside_ms'))})"
    )


def rss_line(run: Row) -> str:
    """One line of a run's RSS per connection, for the driver's progress."""
    o, r = run.get("originator_rss_per_connection"), run.get("recipient_rss_per_connection")
    if o is None or r is None:
        return "RSS per connection n/a"
    ratio = f"{r / o:.2f}" if o > 0 else "n/a"
    return f"RSS per connection: originator {o:,.0f} B, recipient {r:,.0f} B (ratio {ratio})"


def _rss_ratio(run: Row, _floor: Row) -> float | None:
    o, r = run.get("originator_rss_per_connection"), run.get("recipient_rss_per_connection")
    return r / o if o and r is not None and o > 0 else None


def _probe_ratio(run: Row, _floor: Row) -> float | None:
    worst = (run.get("probe") or {}).get("worst_ms")
    return worst / run["pause_ms"] if worst is not None and run["pause_ms"] else None


def _floor_ratio(run: Row, floor: Row) -> float | None:
    app = _floor_ms(floor)
    return run["pause_ms"] / app if app else None


# Issue 16's goals: (N, what, target ratio, the ratio in one run (run, its floor)).
GOALS: list[tuple[int, str, float, Callable[[Row, Row], float | None]]] = [
    (10000, "worst client-visible stall (worst probe, TAKE to release) / pause", 1.2, _probe_ratio),
    (10000, "pause / floor (app objects)", 1.5, _floor_ratio),
    (100000, "pause / floor (app objects)", 2.0, _floor_ratio),
    (100000, "recipient RSS per connection / originator's", 1.2, _rss_ratio),
]


def goals(data: Row) -> list[Row]:
    """Each goal at a size that was run: the ratio in each run (side by side, the
    same run's figures), its median, the target and whether the median meets it."""
    result = []
    # A goal's size that could not be run here, run at the largest size that fits.
    stands_in = {int(run): int(asked) for asked, run in data.get("shrunk", {}).items()}
    for size, runs, floors in _by_size(data):
        for goal_size, what, target, ratio in GOALS:
            if goal_size not in (size, stands_in.get(size)):
                continue
            values = [v for v in (ratio(r, f) for r, f in zip(runs, floors)) if v is not None]
            median = statistics.median(values) if values else None
            result.append(
                {
                    "connections": size,
                    "for": goal_size,
                    "goal": what,
                    "target": target,
                    "value": median,
                    "values": values,
                    "runs_met": sum(v <= target for v in values),
                    "met": median is not None and median <= target,
                }
            )
    return result


def _by_size(data: Row) -> list[tuple[int, list[Row], list[Row]]]:
    result = []
    for size in data["sizes"]:
        runs = [r for r in data["runs"] if r["connections"] == size]
        floors = [f for f in data["floors"] if f["connections"] == size]
        if runs:
            result.append((size, runs, floors))
    return result


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _column(rows: list[Row], get: Callable[[Row], float | None]) -> list[float]:
    return [v for v in (get(r) for r in rows) if v is not None]


def render(data: Row) -> str:
    m = data["machine"]
    out = [
        "# takeover: scaling of a move with the number of connections",
        "",
        f"Produced by `{data['command']}` on {data['date']} (commit {m.get('commit') or '?'}"
        f"{', src/ modified' if m.get('src_dirty') else ''}), "
        f"{data['repeats']} run(s) per size.",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m.get('memory_mb', '?')} MB RAM",
        f"- Python: {m['python']}",
        f"- Kernel: {m['kernel']}",
        f"- RLIMIT_NOFILE (soft, hard): {m['nofile'][0]}, {m['nofile'][1]}"
        + (
            f" (raised from {data['nofile_before'][0]}, {data['nofile_before'][1]})"
            if data.get("nofile_before") and list(data["nofile_before"]) != list(m["nofile"])
            else ""
        ),
        f"- Event loop of the originator and the recipient: **{data.get('loop', 'asyncio')}**",
        *(
            [
                "- Runnable processes besides the benchmark before each run: "
                + cell([r["quiet"]["runnable"] for r in data["runs"] if "quiet" in r], 1)
                + f" (each run waited up to {data['quiet_wait']:g} s for fewer than the CPUs)"
            ]
            if "quiet_wait" in data
            else []
        ),
        "",
        "Each run: a line-echo originator (`benchmarks/_echo_app.py`) in its own process, N idle",
        "TCP connections to it opened by client processes (`benchmarks/_clients.py`, one per",
        "25,000 connections unless `--client-procs` says; each connection from a source address",
        "of its own range, 127.0.0.2 onwards), the service moved to a recipient process",
        f"({RECIPIENTS.get(data.get('recipient', 'library'), '?')}), a sample of the",
        "connections checked to still echo through the recipient. Figures are the median over",
        "the runs with (min..max).",
        *(
            ["", "**The cyclic GC was disabled in the originator and the recipient.**"]
            if data.get("gc_off")
            else []
        ),
        "",
        "- **pause**: `pause_ms` as the recipient reports it (`takeover take --json` prints the",
        "  same figure): from the start of the originator's quiesce to the end of the",
        "  recipient's `start()`, on the shared monotonic clock.",
        "- **take**: the recipient's `RecipientSession.take` from sending TAKE to the",
        "  service committed and started; **connect→started** adds connect, HELLO and LIST.",
        "- **floor**: the same work with nothing else (`benchmarks/_floor.py`): N + 1 socket",
        "  descriptors passed over SCM_RIGHTS to another process in batches of 253, plus",
        "  `pickle.dumps` and `pickle.loads` (cyclic GC paused, as in a move) of either",
        "  - **the same graph**: the service's own objects as a move pickles them (the",
        "    quiesced server, its N transports and their protocols) with plain pickle, a",
        "    socket pickled as its descriptor number: the floor the issue describes;",
        "  - **app objects**: N bare protocol objects, no transport: the application's",
        "    state alone, a stricter floor that counts the transports' state as overhead.",
        "- **peak RSS**: VmHWM of each process at its exit (the originator exits once the",
        "  service has moved; the recipient after the echo check).",
        "",
        "## Results",
        "",
    ]
    rows = []
    for size, runs, floors in _by_size(data):
        pauses = [r["pause_ms"] for r in runs]
        floor = [_floor_ms(f) for f in floors]
        graph_floor = [_graph_floor_ms(f) for f in floors]
        rows.append(
            [
                str(size),
                cell(pauses),
                cell([r.get("take_ms") for r in runs]),
                cell([r.get("total_ms") for r in runs]),
                cell([r["graph_bytes"] for r in runs], 0),
                cell(graph_floor),
                cell(_ratios(pauses, graph_floor), 1),
                cell(floor),
                cell(_ratios(pauses, floor), 1),
                cell([r["originator_memory"]["vmhwm_kb"] for r in runs], 1, 1 / 1024),
                cell([r["recipient_memory"]["vmhwm_kb"] for r in runs], 1, 1 / 1024),
            ]
        )
    out += _table(
        [
            "N",
            "pause ms",
            "take ms",
            "connect→started ms",
            "graph bytes",
            "floor ms, same graph",
            "pause/floor, same graph",
            "floor ms, app objects",
            "pause/floor, app objects",
            "originator peak RSS MB",
            "recipient peak RSS MB",
        ],
        rows,
    )
    for size, reason in data.get("skipped", {}).items():
        run = data.get("shrunk", {}).get(size)
        instead = f"; N={run:,} was run instead" if run else ""
        out += ["", f"N={size} was skipped: {reason}{instead}."]
    out += _goals(data)

    if any("originator_gaps" in r for r in data["runs"]):
        out += _felt(data)
    out += ["", "## The floor", ""]
    rows = []
    for size, runs, floors in _by_size(data):
        floor = [_floor_ms(f) for f in floors]
        graph_floor = [_graph_floor_ms(f) for f in floors]
        takes = [r.get("take_ms") for r in runs]
        rows.append(
            [
                str(size),
                str(size + 1),
                cell([f["fds_ms"] for f in floors]),
                cell([f.get("graph_dumps_ms") for f in floors]),
                cell([f.get("graph_loads_ms") for f in floors]),
                cell([f.get("graph_bytes") for f in floors], 0),
                cell(graph_floor),
                cell(_ratios(takes, graph_floor), 1),
                cell([f["dumps_ms"] for f in floors]),
                cell([f["loads_ms"] for f in floors]),
                cell([f["pickle_bytes"] for f in floors], 0),
                cell(floor),
                cell(_ratios(takes, floor), 1),
            ]
        )
    out += _table(
        [
            "N",
            "fds",
            "SCM_RIGHTS ms",
            "same graph: dumps ms",
            "loads ms",
            "bytes",
            "floor ms",
            "take/floor",
            "app objects: dumps ms",
            "loads ms",
            "bytes",
            "floor ms",
            "take/floor",
        ],
        rows,
    )

    out += [
        "",
        "## Where the pause goes",
        "",
        "The pause cut at the marks both processes recorded (ms, median). The phases in the",
        "pause add up to it, give or take the clock reads. Outside it: the dry run and the",
        "sockets sent ahead (the service still runs; the recipient builds and registers them",
        "meanwhile; the next column is how long before the graph it was done, negative if",
        "the graph waited for it) and the originator's release after commit.",
        "",
    ]
    rows = []
    for size, runs, _floors in _by_size(data):
        row = [str(size)]
        for phase in PHASES + OUTSIDE:
            row.append(cell(_column(runs, lambda r, p=phase: _phase(r, p))))  # type: ignore[misc]
        rows.append(row)
    out += _table(["N"] + [p[0] for p in PHASES + OUTSIDE], rows)

    out += [
        "",
        "What each optimisation bought, change by change: `benchmarks/README.md`",
        '("What each optimisation bought").',
    ]
    out += ["", "## Memory", ""]
    rows = []
    for size, runs, _floors in _by_size(data):
        rows.append(
            [
                str(size),
                cell([r["originator_idle_memory"].get("vmrss_kb", 0) for r in runs], 1, 1 / 1024),
                cell([r["originator_memory"]["vmhwm_kb"] for r in runs], 1, 1 / 1024),
                cell([r["recipient_memory_before"].get("vmrss_kb") for r in runs], 1, 1 / 1024),
                cell([r["recipient_memory"]["vmhwm_kb"] for r in runs], 1, 1 / 1024),
                cell([r.get("originator_rss_per_connection") for r in runs], 0),
                cell([r.get("recipient_rss_per_connection") for r in runs], 0),
                cell([_rss_ratio(r, {}) for r in runs], 2),
                cell([r.get("setup_s") for r in runs], 1),
            ]
        )
    out += [
        "RSS per connection, in bytes: the **originator**'s VmRSS with every connection held,",
        "just before TAKE, less its VmRSS serving with none (before the clients connected); the",
        "**recipient**'s VmRSS once the service started less its VmRSS before it connected",
        "(which includes loading the app's script, once); each divided by the connections",
        "held (N and the probes). **setup**: opening the N connections and the probes until",
        "the originator has accepted them all.",
        "",
    ]
    out += _table(
        [
            "N",
            "originator RSS before the move MB",
            "originator peak MB",
            "recipient RSS before connecting MB",
            "recipient peak MB",
            "originator RSS/conn B",
            "recipient RSS/conn B",
            "recipient/originator",
            "setup s",
        ],
        rows,
    )
    if data.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]]
    out.append("")
    return "\n".join(out)


def _goals(data: Row) -> list[str]:
    """The section on issue 16's goals, at the sizes that were run (none: no section)."""
    rows = []
    for goal in data.get("goals") or goals(data):
        value, values = goal["value"], goal["values"]
        rows.append(
            [
                f"{goal['connections']:,}"
                + (
                    f" (for {goal['for']:,}, which does not fit here)"
                    if goal.get("for", goal["connections"]) != goal["connections"]
                    else ""
                ),
                goal["goal"],
                cell(values, 2) if values else "n/a (not measured)",
                f"≤ {goal['target']:g}",
                f"{goal['runs_met']}/{len(values)}",
                "met" if goal["met"] else ("**not met**" if value is not None else "n/a"),
            ]
        )
    shrunk = data.get("shrunk", {})
    not_run = [
        f"N={int(size):,} was not run ({reason}): "
        + (
            f"its goals are measured at N={shrunk[size]:,}, the most this machine holds."
            if size in shrunk
            else "its goals are not measured."
        )
        for size, reason in data.get("skipped", {}).items()
        if any(g[0] == int(size) for g in GOALS)
    ]
    if not rows and not not_run:
        return []
    return [
        "",
        "## Goals",
        "",
        "Issue 16's goals, each a ratio of two figures of the same run (median over the runs,",
        "(min..max)); a goal is met when the median is within the target. *Worst probe*:",
        "the longest echo a probe connection waited for, TAKE to the originator's release",
        '(see "What a client feels"); *floor (app objects)*: see below; RSS per connection:',
        'see "Memory".',
        "",
        *(
            _table(["N", "goal", "measured", "target", "runs within", "verdict"], rows)
            if rows
            else []
        ),
        *[line for text in not_run for line in ("", text)],
    ]


def _felt(data: Row) -> list[str]:
    """The section on what a client feels: the loops' stalls and the probes' latency."""
    probes = data.get("probes") or 0
    out = [
        "",
        "## What a client feels",
        "",
        "The pause is not all a client waits for. Both processes run a heartbeat on their",
        "event loop (`asyncio.sleep(0.0005)` over and over; a *stall* is the longest gap",
        "between two turns): the **originator** from TAKE received to the end of its",
        "release, the **recipient** from its start (connect) to the service started.",
        "*Before quiesce*: the longest of those stalls that was over before the quiesce",
        "started, the service still running (the originator's dry run; the recipient's",
        "loading of the script and building of the sockets sent ahead, which slows no",
        "client of the service, but shares the CPUs).",
        *(
            [
                f"{probes} probe connections (`benchmarks/_probe.py`, another process, moved with",
                "the N idle ones) each send a line every 1 ms and time its echo from when it was",
                "due, one line in flight each: **worst probe** is the longest of the lines",
                "answered after TAKE and due before the originator's release, *before quiesce*",
                "those answered before the quiesce started, *outside* the longest of all the",
                "others (before and after the move: the machine's own noise). Ratios are taken",
                "within each run. **dry run** is the originator's `_dry_run` (phase marks).",
            ]
            if probes
            else []
        ),
        "",
    ]
    rows = []
    for size, runs, _floors in _by_size(data):
        st = [stalls(r) for r in runs]
        pauses = [r["pause_ms"] for r in runs]
        probe = [r.get("probe") or {} for r in runs]
        worst = [p.get("worst_ms") for p in probe]
        ostall = [s["originator"] for s in st]
        rows.append(
            [
                str(size),
                cell(pauses),
                cell(worst, 2),
                cell(_ratios(worst, pauses), 1),
                cell(ostall, 2),
                cell(_ratios(ostall, pauses), 1),
                cell([s["originator_before"] for s in st], 2),
                cell(_column(runs, lambda r: _phase(r, DRY_RUN)), 2),
                cell([s["recipient"] for s in st], 2),
                cell([s["recipient_before"] for s in st], 2),
                cell([p.get("worst_before_pause_ms") for p in probe], 2),
                cell([p.get("worst_outside_ms") for p in probe], 2),
            ]
        )
    out += _table(
        [
            "N",
            "pause ms",
            "worst probe ms",
            "worst probe / pause",
            "originator stall ms",
            "originator stall / pause",
            "originator stall before quiesce ms",
            "dry run ms",
            "recipient stall ms",
            "recipient stall before quiesce ms",
            "worst probe before quiesce ms",
            "worst probe outside the move ms",
        ],
        rows,
    )
    return out


def write(data: Row, directory: str, name: str = "scale") -> tuple[str, str]:
    """Write ``NAME.json`` and ``NAME.md`` into ``directory``; return their paths."""
    json_path = os.path.join(directory, f"{name}.json")
    md_path = os.path.join(directory, f"{name}.md")
    data["goals"] = goals(data)
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render(data))
    return json_path, md_path


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        loaded = json.load(f)
    directory, base = os.path.split(path)
    print(write(loaded, directory or ".", os.path.splitext(base)[0])[1])
