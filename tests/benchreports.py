"""Reading the benchmarks' reports and processes, for their tests
(tests/test_bench.py, tests/test_bench_websocket.py)."""

from __future__ import annotations

import os
import re


def number(text: str) -> float:
    """The median at the start of a cell such as ``1.234 (1.100..1.400)``."""
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)", text)
    assert match, f"not a number: {text!r}"
    return float(match.group(1))


def table(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
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


def processes_tagged(tag: str) -> list[int]:
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
