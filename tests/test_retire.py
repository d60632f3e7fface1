"""A process whose services have all moved away retires: frozen GC heap, idle CPU class.

Each case runs in a child process, since retiring changes the process for good.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from harness.procs import ROOT

SRC = os.path.join(ROOT, "src")

PROGRAM = textwrap.dedent(
    """
    import asyncio, gc, json, os, sys
    import takeover.asyncio as takeover

    async def main(control, retire):
        server = await takeover.start_server(asyncio.Protocol, "127.0.0.1", 0, name="s")
        before = os.sched_getscheduler(0)

        def ready(migration):
            # As if a recipient had taken it: the registry empties.
            asyncio.get_running_loop().call_soon(migration.registry.withdraw, "s")

        await takeover.serve_until_moved(server, control=control, ready=ready, retire=retire)
        server.close()
        print(json.dumps({
            "frozen": gc.get_freeze_count(),
            "policy_before": before,
            "policy_after": os.sched_getscheduler(0),
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


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_serve_until_moved_retires_the_process(workdir: str) -> None:
    result = _run(workdir, retire=True)
    assert result["policy_before"] == os.SCHED_OTHER
    assert result["policy_after"] == os.SCHED_IDLE
    assert result["frozen"] > 1000  # the interpreter's and takeover's objects at least
    assert result["gc_enabled"]  # new objects are still collected


def test_retire_false_leaves_the_process_alone(workdir: str) -> None:
    result = _run(workdir, retire=False)
    assert result["frozen"] == 0
    assert result["policy_after"] == result["policy_before"] == os.SCHED_OTHER


def test_retire_without_idle_priority_only_freezes() -> None:
    code = (
        "import gc, os, takeover; takeover.retire(idle_priority=False); "
        "print(gc.get_freeze_count() > 0, os.sched_getscheduler(0) == os.SCHED_OTHER)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.skipif(shutil.which("pypy3") is None, reason="no pypy3 (make interpreters)")
def test_retire_on_pypy_lowers_the_priority_without_gc_freeze() -> None:
    """PyPy has neither gc.freeze nor os.SCHED_IDLE: retire() takes nice 19."""
    code = "import os, takeover; takeover.retire(); print(os.nice(0))"
    out = subprocess.run(
        ["pypy3", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["19"]
