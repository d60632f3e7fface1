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
        f"- RLIMIT_NOFILE (soft, hard): {m['nofile'][0]}, {m['nofile'][1]}",
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
        "TCP connections to it opened by the driver, the service moved to a recipient process",
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
        out += ["", f"N={size} was skipped: {reason}."]

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
            ]
        )
    out += _table(
        [
            "N",
            "originator RSS before the move MB",
            "originator peak MB",
            "recipient RSS before connecting MB",
            "recipient peak MB",
        ],
        rows,
    )
    if data.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in data["plots"]]
    out.append("")
    return "\n".join(out)


def write(data: Row, directory: str, name: str = "scale") -> tuple[str, str]:
    """Write ``NAME.json`` and ``NAME.md`` into ``directory``; return their paths."""
    json_path = os.path.join(directory, f"{name}.json")
    md_path = os.path.join(directory, f"{name}.md")
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
