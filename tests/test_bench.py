"""The scaling benchmark still runs: tiny sizes, one run, into a temporary directory.

Nothing here is timed: the test checks that benchmarks/scale.py produces a
report with a row of numbers per size and the pause/floor ratio, and that it
leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

from procs import ROOT

SCALE = os.path.join(ROOT, "benchmarks", "scale.py")
SIZES = (1, 10)


def _number(text: str) -> float:
    """The median at the start of a cell such as ``1.234 (1.100..1.400)``."""
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)", text)
    assert match, f"not a number: {text!r}"
    return float(match.group(1))


def _table(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first table after ``## heading``."""
    section = markdown.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    lines = []
    for line in section[start:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def _processes_tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (the benchmark's children)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def test_scale_quick_path(workdir: str) -> None:
    tag = f"TAKEOVER_BENCH_TEST={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    sizes = ",".join(map(str, SIZES))
    result = subprocess.run(
        [sys.executable, SCALE, "--sizes", sizes, "--repeats", "1", "--out", workdir],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not _processes_tagged(tag), "the benchmark left processes running"

    with open(os.path.join(workdir, "scale.md")) as f:
        markdown = f.read()
    assert "Produced by `" in markdown and "CPU:" in markdown and "Kernel:" in markdown

    header, rows = _table(markdown, "Results")
    assert "pause ms" in header and "floor ms" in header and "pause/floor" in header
    assert [int(row[0]) for row in rows] == list(SIZES)
    for row in rows:
        assert len(row) == len(header)
        values = [_number(cell) for cell in row[1:]]
        ratio = values[header.index("pause/floor") - 1]
        assert ratio > 0 and values[header.index("pause ms") - 1] > 0

    header, rows = _table(markdown, "The floor")
    assert "pause/floor" in header and "SCM_RIGHTS ms" in header
    assert [int(row[0]) for row in rows] == list(SIZES)
    for row in rows:
        assert all(_number(cell) >= 0 for cell in row[1:])

    with open(os.path.join(workdir, "scale.json")) as f:
        data = json.load(f)
    assert [run["connections"] for run in data["runs"]] == list(SIZES)
    assert all(run["echo_checked"] >= 1 for run in data["runs"])
