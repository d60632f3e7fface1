"""PNG plots of the benchmark results (matplotlib: ``pip install -e '.[bench]'``).

    python benchmarks/plots.py [--scale results/scale.json]... [--overlay results/scale-uvloop.json]
        [--load results/load.json]
        [--sidebyside results/sidebyside.json]... [--websocket results/websocket.json]

* ``NAME-pause.png`` from scale.py's results (``--scale`` may be given more
  than once): pause (and take, the worst probe, and the floors) against the
  number of connections, median with min..max bars, log-log; ``--overlay
  JSON`` adds the pause and worst probe of another run (``--loop uvloop``) to
  each, labelled with its event loop.
* ``NAME-latency.png`` from load.py's results: latency over time across the
  moves, per app: the worst and the median latency of the requests sent in
  each 20 ms, the moving run against the steady and the moving + starts runs
  of the same repeat, each move's pause shaded.
* ``NAME-latency.png`` from websocket.py's results (``--websocket``): the
  same as load.py's, per compression setting: the moving run of the first
  repeat against the steady run of that repeat.
* ``NAME-latency.png`` from sidebyside.py's results (``--sidebyside`` may be
  given once per scenario): the worst latency of the long-lived connections
  per 20 ms around the replacement, per strategy, and the new connections
  that failed.

Each plot is written next to its JSON, which gets a ``plots`` entry, and the
JSON's markdown report is written again with the plot in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


def _spread(values: list[float]) -> tuple[float, float, float]:
    median = statistics.median(values)
    return median, median - min(values), max(values) - median


def _series(ax: Any, sizes: list[int], rows: list[Any], get: Any, style: str, label: str) -> None:
    """One series against N: the median of ``get`` over ``rows`` per size, min..max bars."""
    xs, ys, lo, hi = [], [], [], []
    for n in sizes:
        values = [get(r) for r in rows if r["connections"] == n and get(r) is not None]
        if not values:
            continue
        median, below, above = _spread(values)
        xs.append(n)
        ys.append(median)
        lo.append(below)
        hi.append(above)
    if xs:
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=label)


def _worst_probe(run: dict[str, Any]) -> float | None:
    return (run.get("probe") or {}).get("worst_ms")


def plot_scale(
    data: dict[str, Any], path: str, overlays: list[dict[str, Any]] | None = None
) -> None:
    """Pause, take, the floors and (with probes) the worst probe against N; each of
    ``overlays`` (scale.py's results on another event loop, say) adds its pause and
    worst probe, labelled with its loop."""
    overlays = overlays or []
    sizes = sorted(
        {
            n
            for d in [data, *overlays]
            for n in d["sizes"]
            if any(r["connections"] == n for r in d["runs"])
        }
    )
    fig, ax = plt.subplots(figsize=(7.5, 5))
    loop = f" ({data.get('loop', 'asyncio')})" if overlays else ""
    series = [
        (f"pause (quiesce → started){loop}", lambda r: r["pause_ms"], data["runs"], "o-"),
        ("take (TAKE → started)", lambda r: r.get("take_ms"), data["runs"], "s--"),
        (f"worst probe (TAKE → release){loop}", _worst_probe, data["runs"], "D-"),
        (
            "floor: same graph (SCM_RIGHTS + plain pickle)",
            lambda f: (
                f["fds_ms"] + f["graph_dumps_ms"] + f["graph_loads_ms"]
                if "graph_dumps_ms" in f
                else None
            ),
            data["floors"],
            "^:",
        ),
        (
            "floor: app objects only",
            lambda f: f["fds_ms"] + f["dumps_ms"] + f["loads_ms"],
            data["floors"],
            "v:",
        ),
    ]
    for other in overlays:
        name = other.get("loop", "asyncio")
        series.append((f"pause ({name})", lambda r: r["pause_ms"], other["runs"], "o-."))
        series.append((f"worst probe ({name})", _worst_probe, other["runs"], "D-."))
    for label, get, rows, style in series:
        _series(ax, sizes, rows, get, style, label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("idle connections moved")
    ax.set_ylabel("ms (median, bars: min..max)")
    ax.set_title(f"Pause against connection count ({data['repeats']} runs per size)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, f"{data['command']} · {data['date']}", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(data: dict[str, Any], path: str) -> None:
    import load

    apps = load.variants(data)  # each app on each loop (load.py --loop asyncio,uvloop)
    fig, axes = plt.subplots(len(apps), 1, figsize=(11, 3.6 * len(apps)), squeeze=False)
    for ax, app in zip(axes[:, 0], apps):
        runs = [r for r in data["runs"] if load.variant(r) == app]
        moving = next((r for r in runs if r["mode"] == "moving"), None)
        if moving is None:
            continue
        steady = next(
            (r for r in runs if r["mode"] == "steady" and r["repeat"] == moving["repeat"]), None
        )
        if steady is not None:
            s = steady["series"]
            ax.plot(s["t"], s["max_ms"], color="0.6", lw=0.8, label="steady: worst per 20 ms")
        deploy = next(
            (r for r in runs if r["mode"] == "moving_starts" and r["repeat"] == moving["repeat"]),
            None,
        )
        if deploy is not None:
            s = deploy["series"]
            ax.plot(
                s["t"],
                s["max_ms"],
                color="tab:green",
                lw=0.7,
                alpha=0.7,
                label="moving + starts (recipients started during the run): worst per 20 ms",
            )
        for move in moving["moves"]:
            end = move["taken"]
            ax.axvspan(end - move["pause_ms"] / 1000, end, color="tab:orange", alpha=0.35, lw=0)
        s = moving["series"]
        ax.plot(s["t"], s["max_ms"], color="tab:red", lw=0.9, label="moving: worst per 20 ms")
        ax.plot(s["t"], s["p50_ms"], color="tab:blue", lw=0.9, label="moving: median per 20 ms")
        ax.set_yscale("log")
        ax.set_xlim(0, data["duration"])
        ax.set_ylabel("latency ms")
        ax.set_title(
            f"{app}: {data['connections']} clients, moved every {data['move_every']:g} s "
            f"({len(moving['moves'])} moves; pauses shaded)"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("seconds into the run (send time)")
    fig.text(0.01, 0.005, f"{data['command']} · {data['date']}", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_websocket(data: dict[str, Any], path: str) -> None:
    compressions = [
        c for c in data["compressions"] if any(r["compression"] == c for r in data["runs"])
    ]
    fig, axes = plt.subplots(
        len(compressions), 1, figsize=(11, 3.4 * len(compressions)), squeeze=False
    )
    for ax, compression in zip(axes[:, 0], compressions):
        runs = [r for r in data["runs"] if r["compression"] == compression]
        moving = next((r for r in runs if r["phase"] == "moving"), None)
        if moving is None:
            continue
        steady = next(
            (r for r in runs if r["phase"] == "steady" and r["repeat"] == moving["repeat"]), None
        )
        if steady is not None:
            s = steady["series"]
            ax.plot(s["t"], s["max_ms"], color="0.6", lw=0.8, label="steady: worst per 20 ms")
        for move in moving["moves"]:
            end = move["taken"]
            ax.axvspan(end - move["pause_ms"] / 1000, end, color="tab:orange", alpha=0.35, lw=0)
        s = moving["series"]
        ax.plot(s["t"], s["max_ms"], color="tab:red", lw=0.9, label="moving: worst per 20 ms")
        ax.plot(s["t"], s["p50_ms"], color="tab:blue", lw=0.9, label="moving: median per 20 ms")
        ax.set_yscale("log")
        ax.set_xlim(0, data["duration"])
        ax.set_ylabel("latency ms")
        ax.set_title(
            f"{compression}: {data['connections']:,} WebSocket clients, moved every "
            f"{data['move_every']:g} s ({len(moving['moves'])} moves of all of them; "
            "pauses shaded)",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("seconds into the run (send time)")
    fig.text(0.01, 0.005, f"{data['command']} · {data['date']}", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sidebyside(data: dict[str, Any], path: str) -> None:
    import sidebyside

    strategies = [s for s in sidebyside.STRATEGIES if any(r["strategy"] == s for r in data["runs"])]
    fig, axes = plt.subplots(
        len(strategies),
        1,
        figsize=(11, 2.4 * len(strategies)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for ax, strategy in zip(axes[:, 0], strategies):
        run = next(r for r in data["runs"] if r["strategy"] == strategy)
        up = run["upgrade_at"]
        s = run["long_series"]
        ax.plot([t - up for t in s["t"]], s["max_ms"], color="tab:red", lw=0.9, label="worst")
        ax.plot([t - up for t in s["t"]], s["p50_ms"], color="tab:blue", lw=0.9, label="median")
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(run["old_gone_ms"] / 1000, color="k", ls="--", lw=0.8, label="old gone")
        ax.axvline(
            run["new_serving_ms"] / 1000, color="tab:green", ls=":", lw=1, label="new serving"
        )
        failed = [t for t, _kind in run["new_failures"]]
        if failed:
            ax.plot(failed, [0.2] * len(failed), "kx", ms=4, label="new connection failed")
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(
            f"{sidebyside.LABELS[strategy]}: {run['long_broken']} of {data['connections']} "
            "long-lived connections broken",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel(
        "seconds from the start of the replacement (long-lived latency per 20 ms, first repeat)"
    )
    if data.get("server") == "streams":
        fig.suptitle(
            f"a coroutine (asyncio streams) server; drain deadline {data['drain']:g} s",
            fontsize=11,
        )
    fig.text(0.01, 0.005, f"{data['command']} · {data['date']}", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _with_plot(json_path: str, suffix: str, draw: Any) -> str:
    data = _load(json_path)
    directory, base = os.path.split(json_path)
    name = os.path.splitext(base)[0]
    png = f"{name}-{suffix}.png"
    draw(data, os.path.join(directory or ".", png))
    data["plots"] = [png]
    kind = data.get("kind", "scale")
    if kind == "load":
        import load

        load.write(data, directory or ".", name)
    elif kind == "sidebyside":
        import sidebyside

        sidebyside.write(data, directory or ".", name)
    elif kind == "websocket":
        import websocket

        websocket.write(data, directory or ".", name)
    else:
        import report

        report.write(data, directory or ".", name)
    return os.path.join(directory or ".", png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="append", default=[], help="scale.py's JSON (repeatable)")
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        help="scale.py's JSON of another run (--loop uvloop, say): its pause and worst probe "
        "drawn on every --scale plot (repeatable)",
    )
    parser.add_argument("--load", help="load.py's JSON")
    parser.add_argument(
        "--sidebyside", action="append", default=[], help="sidebyside.py's JSON (repeatable)"
    )
    parser.add_argument("--websocket", help="websocket.py's JSON")
    args = parser.parse_args(argv)
    overlays = [_load(path) for path in args.overlay]

    def scale(data: dict[str, Any], png: str) -> None:
        plot_scale(data, png, overlays)

    for path, suffix, draw in (
        *((path, "pause", scale) for path in args.scale),
        (args.load, "latency", plot_load),
        *((path, "latency", plot_sidebyside) for path in args.sidebyside),
        (args.websocket, "latency", plot_websocket),
    ):
        if path:
            print(f"wrote {_with_plot(path, suffix, draw)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
