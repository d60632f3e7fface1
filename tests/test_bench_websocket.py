"""The WebSocket benchmark still runs end to end: 20 clients, 1.2 s runs, one repeat.

Nothing here is timed: benchmarks/websocket.py must exit 0 (no message lost,
repeated or out of order, no connection closed, every move carrying every
connection), write its report and leave no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from benchreports import number, processes_tagged, table
from harness.procs import ROOT

pytest.importorskip("wsproto")
pytest.importorskip("h11")
pytest.importorskip("websockets.asyncio.client")  # websockets >= 13

BENCH = os.path.join(ROOT, "benchmarks", "websocket.py")
CONNECTIONS = 20


@pytest.mark.slow
def test_websocket_quick_path(workdir: str) -> None:
    key, value = "TAKEOVER_BENCH_TEST", uuid.uuid4().hex
    args = ["--connections", str(CONNECTIONS), "--clients", "2", "--duration", "1.2"]
    args += ["--warmup", "0.3", "--move-every", "0.3", "--interval", "0.05"]
    args += ["--compression", "deflate,deflate-full,none", "--fill", "4096"]
    args += ["--repeats", "1", "--quiet-wait", "0", "--out", workdir, "--name", "ws"]
    result = subprocess.run(
        [sys.executable, BENCH, *args],
        env={**os.environ, key: value},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not processes_tagged(f"{key}={value}"), "the benchmark left processes running"

    with open(os.path.join(workdir, "ws.md")) as f:
        markdown = f.read()
    assert "Produced by `" in markdown and "CPU:" in markdown and "websockets" in markdown
    header, rows = table(markdown, "Integrity")
    assert [(row[0], row[1]) for row in rows] == [
        (compression, phase)
        for compression in ("deflate", "deflate-full", "none")
        for phase in ("steady", "moving")
    ]
    for row in rows:
        assert len(row) == len(header)
        for column in (
            "lost",
            "duplicated",
            "out of order or wrong",
            "connections closed",
            "client errors",
            "failed moves",
            "server tracebacks",
        ):
            assert row[header.index(column)] == "0", (column, row)
        assert number(row[header.index("messages measured per run")]) > 0
    agreed = header.index("permessage-deflate agreed (connections, all runs)")
    assert all("permessage-deflate" in row[agreed] for row in rows[:4])
    assert rows[4][agreed] == rows[5][agreed] == f"none: {CONNECTIONS}"
    header, rows = table(markdown, "Latency: moving against steady")
    assert [row[1] for row in rows[:4]] == ["p50", "p99", "p99.9", "max"]
    assert all(number(row[header.index("moving / steady")]) > 0 for row in rows)
    header, rows = table(markdown, "The moves")
    assert all(number(row[header.index("pause ms (`pause_ms`)")]) > 0 for row in rows)

    with open(os.path.join(workdir, "ws.json")) as f:
        data = json.load(f)
    for run in data["runs"]:
        assert run["sent"] == run["answered"] > 0
        if run["phase"] == "moving":
            moves = run["moves"]
            assert moves, "no move happened"
            assert [m["connections"] for m in moves] == [CONNECTIONS] * len(moves)
            # Every connection was answered by every process the service went through,
            # but the last, if that move ended too near the end for every connection
            # to send again (on a busy machine).
            early = sum(1 for m in moves if m["serving"] < data["duration"] - 0.15)
            fewest, most = run["pids_per_connection"]
            assert early + 1 <= fewest <= most <= len(moves) + 1, (early, fewest, most, moves)
        else:
            assert not run["moves"] and run["pids_per_connection"] == [1, 1]
    # The full windows move: a bigger graph than the same connections' fresh windows.
    graphs = {r["compression"]: r["moves"][0]["graph_bytes"] for r in data["runs"] if r["moves"]}
    assert graphs["deflate-full"] > graphs["deflate"] > graphs["none"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "count"), [("drop:7", "lost"), ("dup:11", "duplicates"), ("close:5", "closes")]
)
def test_websocket_catches_faults(workdir: str, fault: str, count: str) -> None:
    """A server that drops, repeats or closes (``_ws_app.py``'s $BENCH_WS_FAULT) fails
    the benchmark: exit 1, the count in the report, still no process left."""
    key, value = "TAKEOVER_BENCH_TEST", uuid.uuid4().hex
    args = ["--connections", "4", "--clients", "2", "--duration", "0.6", "--warmup", "0.2"]
    args += ["--move-every", "0.2", "--interval", "0.05", "--compression", "none"]
    args += ["--repeats", "1", "--quiet-wait", "0", "--out", workdir, "--name", "ws"]
    result = subprocess.run(
        [sys.executable, BENCH, *args],
        env={**os.environ, key: value, "BENCH_WS_FAULT": fault},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr
    assert not processes_tagged(f"{key}={value}"), "the benchmark left processes running"
    with open(os.path.join(workdir, "ws.json")) as f:
        data = json.load(f)
    assert [r["phase"] for r in data["runs"]] == ["steady", "moving"]
    assert all(r[count] > 0 for r in data["runs"]), [r[count] for r in data["runs"]]
    with open(os.path.join(workdir, "ws.md")) as f:
        assert "First problems:" in f.read()
