"""A process whose services have all moved away retires: frozen GC heap, idle CPU class.

Each case runs in a child process, since retiring changes the process for good.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pythons
from harness.procs import ROOT

SRC = os.path.join(ROOT, "src")

PROGRAM = textwrap.dedent(
    """
    import asyncio, gc, json, os, sys
    import takeover.asyncio as takeover

    async def main(control, retire):
        server = await takeover.start_server(asyncio.Protocol, "127.0.0.1", 0, name="s")
        before, nice = os.sched_getscheduler(0), os.nice(0)
        # CPython 3.12 starts with a few hundred objects frozen already.
        frozen = gc.get_freeze_count() if hasattr(gc, "freeze") else None  # PyPy: None

        def ready(migration):
            # As if a recipient had taken it: the registry empties.
            asyncio.get_running_loop().call_soon(migration.registry.withdraw, "s")

        await takeover.serve_until_moved(server, control=control, ready=ready, retire=retire)
        server.close()
        print(json.dumps({
            "frozen_before": frozen,
            "frozen": gc.get_freeze_count() if hasattr(gc, "freeze") else None,
            "policy_before": before,
            "policy_after": os.sched_getscheduler(0),
            "nice_before": nice,
            "nice_after": os.nice(0),
            "gc_enabled": gc.isenabled(),
        }))

    asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
    """
)


def _run(workdir: str, retire: bool) -> dict[str, int]:
    control = os.path.join(workdir, "c.sock")
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, control, "1" if retire else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_serve_until_moved_retires_the_process(workdir: str) -> None:
    """CPython: idle CPU class and a frozen heap; PyPy (no SCHED_IDLE, no gc.freeze): nice 19."""
    result = _run(workdir, retire=True)
    assert result["policy_before"] == os.SCHED_OTHER
    if hasattr(os, "SCHED_IDLE"):
        assert result["policy_after"] == os.SCHED_IDLE
    else:
        assert result["nice_after"] == 19
    if hasattr(gc, "freeze"):
        # The interpreter's and takeover's objects at least.
        assert result["frozen"] > result["frozen_before"] + 1000
    else:
        assert result["frozen"] is None
    assert result["gc_enabled"]  # new objects are still collected


def test_retire_false_leaves_the_process_alone(workdir: str) -> None:
    result = _run(workdir, retire=False)
    assert result["frozen"] == result["frozen_before"]
    assert result["policy_after"] == result["policy_before"] == os.SCHED_OTHER
    assert result["nice_after"] == result["nice_before"]


def test_retire_without_idle_priority_only_freezes() -> None:
    """The priority stays; the heap is frozen where gc.freeze exists (not on PyPy)."""
    code = (
        "import gc, os, takeover; takeover.retire(idle_priority=False); "
        "print(gc.get_freeze_count() > 1000 if hasattr(gc, 'freeze') else 'none', "
        "os.sched_getscheduler(0) == os.SCHED_OTHER, os.nice(0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frozen = "True" if hasattr(gc, "freeze") else "none"
    assert out.stdout.split() == [frozen, "True", str(os.nice(0))]


def test_retire_on_pypy_lowers_the_priority_without_gc_freeze() -> None:
    """PyPy has neither gc.freeze nor os.SCHED_IDLE: retire() takes nice 19."""
    code = "import os, takeover; takeover.retire(); print(os.nice(0))"
    out = subprocess.run(
        [pythons.require("pypy3"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["19"]
