"""The scaling benchmark still runs: tiny sizes, one run, into a temporary directory.

Nothing here is timed: the test checks that benchmarks/scale.py produces a
report with a row of numbers per size and the pause/floor ratio, and that it
leaves no process behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

import pythons
from benchreports import number, processes_tagged, table
from harness.procs import ROOT

SIZES = (1, 10)
# The rows of sidebyside.py's results, one a way of replacing the server, in order.
STRATEGIES = [
    "stop and restart",
    "overlapped restart (SO_REUSEPORT)",
    "listener hand-off + drain",
    "takeover",
]


def test_scale_quick_path(workdir: str) -> None:
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    sizes = ",".join(map(str, SIZES))
    _run("scale.py", ["--sizes", sizes, "--repeats", "1", "--out", workdir], tag)

    with open(os.path.join(workdir, "scale.md")) as f:
        markdown = f.read()
    assert "Produced by `" in markdown and "CPU:" in markdown and "Kernel:" in markdown

    header, rows = table(markdown, "Results")
    assert "pause ms" in header
    assert [int(row[0]) for row in rows] == list(SIZES)
    for row in rows:
        assert len(row) == len(header)
        values = [number(cell) for cell in row[1:]]
        assert values[header.index("pause ms") - 1] > 0
        for floor in ("same graph", "app objects"):
            assert values[header.index(f"floor ms, {floor}") - 1] > 0
            assert values[header.index(f"pause/floor, {floor}") - 1] > 0

    header, rows = table(markdown, "What a client feels")
    assert "worst probe ms" in header and "originator stall ms" in header
    assert [int(row[0]) for row in rows] == list(SIZES)
    for row in rows:
        assert len(row) == len(header)
        assert number(row[header.index("worst probe ms")]) > 0  # every line takes some time
        # A column "before quiesce" is n/a when no probe line was answered in that
        # short a time (a millisecond or less at small N, on a busy machine).
        for name in ("pause ms", "originator stall ms", "dry run ms", "recipient stall ms"):
            assert number(row[header.index(name)]) >= 0

    header, rows = table(markdown, "The floor")
    assert "take/floor" in header and "SCM_RIGHTS ms" in header
    assert [int(row[0]) for row in rows] == list(SIZES)
    for row in rows:
        assert all(number(cell) >= 0 for cell in row[1:])

    with open(os.path.join(workdir, "scale.json")) as f:
        data = json.load(f)
    assert [run["connections"] for run in data["runs"]] == list(SIZES)
    assert all(run["echo_checked"] >= 1 for run in data["runs"])
    # The probes were moved with the idle connections, and answered through the move.
    assert all(run["probes"] == 8 and run["probe"]["lines_in_move"] > 0 for run in data["runs"])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_scale_client_processes_rss_and_loop(workdir: str, loop: str) -> None:
    """200 connections from 2 client processes over 4 source addresses, on either
    event loop: moved, checked, RSS per connection measured on both sides."""
    if loop == "uvloop":
        if platform.python_implementation() != "CPython":
            pytest.skip(f"uvloop does not run on {platform.python_implementation()}")
        if importlib.util.find_spec("uvloop") is None:
            pytest.fail("uvloop is not installed on CPython: make venv (the uvloop extra)")
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    args = ["--sizes", "200", "--repeats", "1", "--client-procs", "2", "--per-address", "50"]
    args += ["--loop", loop, "--quiet-wait", "0", "--out", workdir]
    _run("scale.py", args, tag)

    with open(os.path.join(workdir, "scale.json")) as f:
        data = json.load(f)
    assert data["loop"] == loop
    (run,) = data["runs"]
    assert run["connections"] == 200 and run["loop"] == loop
    assert run["client_procs"] == 2 and run["source_addresses"] == 4
    assert run["echo_checked"] >= 2  # a sample from each client process
    assert run["setup_s"] > 0
    assert run["originator_rss_per_connection"] > 0
    assert run["recipient_rss_per_connection"] > 0
    assert data["goals"] == []  # no goal at 200 connections

    with open(os.path.join(workdir, "scale.md")) as f:
        markdown = f.read()
    assert f"Event loop of the originator and the recipient: **{loop}**" in markdown
    assert "## Goals" not in markdown
    header, rows = table(markdown, "Memory")
    assert [row[0] for row in rows] == ["200"]
    for name in ("originator RSS/conn B", "recipient RSS/conn B", "recipient/originator"):
        assert number(rows[0][header.index(name)]) > 0

    # The goals at 10,000 and 100,000 connections, on this run's figures as if
    # it had been of those sizes: one row each, with a verdict, met or not.
    spec = importlib.util.spec_from_file_location(
        "bench_report", os.path.join(ROOT, "benchmarks", "report.py")
    )
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for size in (10000, 100000):
        for row in data["runs"] + data["floors"]:
            row["connections"] = size
        data["sizes"] = [size]
        data.pop("goals", None)
        goals = report.goals(data)
        assert [g["connections"] for g in goals] == [size, size]
        assert all(g["value"] > 0 and g["met"] == (g["value"] <= g["target"]) for g in goals)
        header, rows = table(report.render(data), "Goals")
        assert len(rows) == 2
        assert {row[header.index("verdict")] for row in rows} <= {"met", "**not met**"}


def test_scale_refuses_a_size_no_process_may_hold(workdir: str) -> None:
    """More descriptors than /proc/sys/fs/nr_open: refused before anything runs, the
    limit named; with --skip-unfit the size is skipped and the report says why."""
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    args = ["--sizes", str(nr_open), "--repeats", "1", "--out", workdir]
    result = _run("scale.py", args, status=2, timeout=60)
    assert f"/proc/sys/fs/nr_open = {nr_open}" in result.stderr
    assert not os.listdir(workdir)

    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    _run("scale.py", [*args, "--skip-unfit", "--quiet-wait", "0"], tag)
    with open(os.path.join(workdir, "scale.json")) as f:
        data = json.load(f)
    assert data["runs"] == [] and "nr_open" in data["skipped"][str(nr_open)]


def test_scale_runs_an_unfit_size_at_the_largest_that_fits(workdir: str) -> None:
    """--shrink-unfit: a size over the hard RLIMIT_NOFILE (lowered to 1,300 here) runs
    at the largest whole thousand that fits, and the report says so, its goals too."""
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    args = ["--sizes", "100,100000", "--repeats", "1", "--probes", "2", "--out", workdir]
    _run(
        "scale.py",
        [*args, "--shrink-unfit", "--quiet-wait", "0"],
        tag,
        timeout=180,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1300, 1300)),
    )
    with open(os.path.join(workdir, "scale.json")) as f:
        data = json.load(f)
    assert data["shrunk"] == {"100000": 1000}
    assert sorted(r["connections"] for r in data["runs"]) == [100, 1000]
    assert [(g["connections"], g["for"]) for g in data["goals"]] == [(1000, 100000)] * 2
    with open(os.path.join(workdir, "scale.md")) as f:
        report = f.read()
    assert "N=100000 was skipped: " in report and "N=1,000 was run instead" in report
    assert "| 1,000 (for 100,000, which does not fit here) |" in report


def _run(
    script: str,
    args: list[str],
    tag: str | None = None,
    *,
    status: int = 0,
    timeout: float = 120,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/SCRIPT`` with this interpreter and check that it exits with
    ``status``; given ``tag`` (``NAME=VALUE``, put in its environment), check too
    that it left none of its processes running."""
    env = dict(os.environ)
    if tag is not None:
        name, value = tag.split("=")
        env[name] = value
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        env=env,
        preexec_fn=preexec_fn,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == status, result.stdout + result.stderr
    if tag is not None:
        assert not processes_tagged(tag), "the benchmark left processes running"
    return result


def _plots(workdir: str, option: str, name: str) -> None:
    """With matplotlib there (the bench extra), the plot is drawn and linked from the report."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    _run("plots.py", [option, os.path.join(workdir, f"{name}.json")], tag)
    png = os.path.join(workdir, f"{name}-latency.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(workdir, f"{name}.md")) as f:
        assert f"![{name}-latency.png]({name}-latency.png)" in f.read()


@pytest.mark.slow
def test_load_quick_path(workdir: str) -> None:
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    args = ["--connections", "4", "--duration", "1", "--move-every", "0.2", "--repeats", "1"]
    args += ["--warmup", "0.2", "--quiet-wait", "0"]
    _run("load.py", [*args, "--out", workdir], tag)

    with open(os.path.join(workdir, "load.md")) as f:
        markdown = f.read()
    assert "Produced by `" in markdown and "CPU:" in markdown
    header, rows = table(markdown, "Errors and integrity")
    assert [(row[0], row[1]) for row in rows] == [
        (app, mode)
        for app in ("echo", "http")
        for mode in ("steady", "moving", "starts only", "moving + starts")
    ]
    for row in rows:
        assert row[header.index("errors (all runs)")] == "0"
        assert row[header.index("bytes or requests lost or duplicated (all runs)")] == "0"
        assert row[header.index("failed moves (all runs)")] == "0"
        assert number(row[header.index("requests per run")]) > 0
    header, rows = table(markdown, "Latency: moving against steady")
    assert "moving / steady" in header and "moving + starts / starts only" in header
    assert [(row[0], row[1]) for row in rows][:3] == [
        ("echo", "p50"),
        ("echo", "p99"),
        ("echo", "max"),
    ]
    assert all(number(row[header.index("moving / steady")]) > 0 for row in rows)

    with open(os.path.join(workdir, "load.json")) as f:
        data = json.load(f)
    moving = [r for r in data["runs"] if r["mode"] in ("moving", "moving_starts")]
    assert len(moving) == 4 and all(r["moves"] for r in moving), "no move happened"
    # The clients keep their connections until the last move is over (load.py
    # --hold): every move, however late, carries all four.
    carried = [m["connections"] for r in moving for m in r["moves"]]
    assert carried == [4] * len(carried), carried
    assert all(
        r["hits_check"]["answers"] == r["completed"] + r["warmup_completed"]
        for r in data["runs"]
        if r["app"] == "http"
    )
    _plots(workdir, "--load", "load")


@pytest.mark.slow
def test_load_loops_goals_and_cpu_split(workdir: str) -> None:
    """--loop asyncio,uvloop: each app on both loops, side by side in the run; the
    Goals section and the JSON give each goal's ratio, target and whether it is met
    (met or not: nothing here is timed); the server CPUs' split has a row per run."""
    if platform.python_implementation() != "CPython":
        pytest.skip(f"uvloop does not run on {platform.python_implementation()}")
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    args = ["--connections", "4", "--duration", "1", "--move-every", "0.3", "--repeats", "1"]
    args += ["--warmup", "0.2", "--quiet-wait", "0", "--apps", "echo", "--loop", "asyncio,uvloop"]
    args += ["--modes", "steady,moving", "--name", "lu"]
    _run("load.py", [*args, "--out", workdir], tag)

    with open(os.path.join(workdir, "lu.md")) as f:
        markdown = f.read()
    assert "Event loop of the servers and recipients: asyncio's own; uvloop" in markdown
    header, rows = table(markdown, "Errors and integrity")
    assert [(row[0], row[1]) for row in rows] == [
        ("echo", "steady"),
        ("echo", "moving"),
        ("echo (uvloop)", "steady"),
        ("echo (uvloop)", "moving"),
    ]
    for row in rows:
        assert row[header.index("errors (all runs)")] == "0"
        assert row[header.index("failed moves (all runs)")] == "0"
    header, rows = table(markdown, "Goals")
    assert header == ["app", "goal", "measured", "target", "met"]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        (app, goal, target)
        for app in ("echo", "echo (uvloop)")
        for goal, target in (
            ("p99 moving / steady", "<= 2"),
            ("requests/s moving / steady", ">= 0.9"),
        )
    ]
    assert all(row[4] in ("met", "**not met**") and number(row[2]) > 0 for row in rows)
    header, rows = table(markdown, "Where the server CPUs' time goes")
    assert len(rows) == 4 and all(len(row) == len(header) for row in rows)
    moving = rows[1]
    assert number(moving[header.index("recipient take ms / move")]) > 0

    with open(os.path.join(workdir, "lu.json")) as f:
        data = json.load(f)
    assert data["loops"] == ["asyncio", "uvloop"]
    assert sorted({r["loop"] for r in data["runs"]}) == ["asyncio", "uvloop"]
    assert len(data["goals"]) == 4
    for goal in data["goals"]:
        assert goal["met"] in (True, False) and goal["measured"] > 0
    for run in data["runs"]:
        assert all(value >= 0 for value in run["cpu"]["split_ms"].values())
        assert run["cpu"]["split_ms"]["serving"] > 0
        if run["mode"] == "moving":
            assert run["moves"] and all(m["connections"] == 4 for m in run["moves"])
            assert run["cpu"]["split_ms"]["recipient_take"] > 0


@pytest.mark.slow
def test_sidebyside_quick_path(workdir: str) -> None:
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    args = ["--connections", "3", "--drain", "0.3", "--warmup", "0.3", "--cooldown", "0.4"]
    args += ["--quiet-wait", "0"]
    _run("sidebyside.py", [*args, "--repeats", "1", "--out", workdir], tag)

    with open(os.path.join(workdir, "sidebyside.md")) as f:
        markdown = f.read()
    header, rows = table(markdown, "Results")
    assert [row[0] for row in rows] == STRATEGIES
    broken = header.index("long-lived connections broken")
    for row in rows:
        assert len(row) == len(header)
        assert row[header.index("wrong answers")] == "0"
        assert number(row[header.index("old process gone after ms")]) > 0
    # Only takeover keeps the long-lived connections; the others close them.
    counts = [number(row[broken]) for row in rows]
    assert all(count >= 3 for count in counts[:3]) and counts[3] == 0, counts
    header, rows = table(markdown, "Against takeover, same repeat")
    assert len(rows) == 3
    _plots(workdir, "--sidebyside", "sidebyside")


@pytest.mark.slow
def test_sidebyside_streams_quick_path(workdir: str) -> None:
    """The coroutine (asyncio streams) scenario: takeover's move is partial."""
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    connections = 3
    args = ["--server", "streams", "--connections", str(connections), "--drain", "0.3"]
    args += ["--warmup", "0.3", "--cooldown", "0.4", "--quiet-wait", "0"]
    _run("sidebyside.py", [*args, "--repeats", "1", "--out", workdir, "--name", "s"], tag)

    with open(os.path.join(workdir, "s.md")) as f:
        markdown = f.read()
    assert "a coroutine (asyncio streams) server" in markdown.splitlines()[0]
    header, rows = table(markdown, "Results")
    assert [row[0] for row in rows] == STRATEGIES
    for row in rows:
        assert len(row) == len(header)
        assert row[header.index("wrong answers")] == "0"
    # takeover's listener never closes: no new connection is refused or reset.
    takeover_row = rows[3]
    assert takeover_row[header.index("new connections refused")] == "0"
    assert takeover_row[header.index("new connections reset")] == "0"
    header, rows = table(markdown, "Long-lived connections closed by the server")
    assert len(rows) == 4 and all(len(row) == len(header) for row in rows)

    with open(os.path.join(workdir, "s.json")) as f:
        data = json.load(f)
    assert data["server"] == "streams"
    for run in data["runs"]:
        assert len(run["long_breaks"]) == run["long_broken"]
        if run["strategy"] in ("restart", "reuseport"):
            # The old process closes its connections at SIGTERM.
            assert run["long_broken"] >= connections
    (moved,) = [r for r in data["runs"] if r["strategy"] == "takeover"]
    # Only the listener moved; every long-lived connection stayed to drain, and the
    # old process exited on its own once they were closed.
    assert moved["moved"] == 0 and moved["draining"] >= connections
    assert moved["old_exit"] == 0
    _plots(workdir, "--sidebyside", "s")


def _needs_net_admin() -> None:
    from takeover._core import tcprepair

    if os.geteuid() != 0 or not tcprepair.has_net_admin():
        pythons.skip_or_fail("the cross-host benchmarks need root (CAP_NET_ADMIN)")


def test_crosshost_quick_path(workdir: str) -> None:
    """benchmarks/crosshost.py at 1 and 20 connections: both ways of moving them
    timed, every step of the repair path there."""
    _needs_net_admin()
    _run("crosshost.py", ["--sizes", "1,20", "--repeats", "1", "--out", workdir, "--name", "x"])
    with open(os.path.join(workdir, "x.json")) as f:
        data = json.load(f)
    assert [r["connections"] for r in data["results"]] == [1, 20]
    for row in data["results"]:
        steps = row["repair"]["per_connection_us"]
        assert set(steps) == {
            "freeze", "checkpoint", "pickle", "close_prepare", "lift", "start", "total"
        }  # fmt: skip
        assert all(value > 0 for value in steps.values()), steps
        assert row["scm_rights"]["per_connection_us"]["total"] > 0


def test_crosshost_move_quick_path(workdir: str) -> None:
    """benchmarks/crosshost_move.py with 20 idle connections on the simulated hosts:
    a move across hosts then one on one host, both felt by the probes, the report's
    row filled in."""
    _needs_net_admin()
    args = ["--sizes", "20", "--repeats", "1", "--quiet-wait", "0", "--out", workdir]
    _run("crosshost_move.py", [*args, "--name", "x"], timeout=300)
    with open(os.path.join(workdir, "x.json")) as f:
        data = json.load(f)
    (row,) = data["results"]
    for side in ("across", "here"):
        assert row[side]["pause_ms"] > 0, row
        assert row[side]["worst_probe_ms"] > 0, row
    with open(os.path.join(workdir, "x.md")) as f:
        text = f.read()
    cell = r" [0-9.]+ \|"
    assert re.search(rf"^\| 20 \|{cell * 6}$", text, re.M), text
