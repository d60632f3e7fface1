"""The test suite on every supported interpreter this machine has (make matrix).

One session per interpreter, ``tests-3.9`` to ``tests-3.13`` and
``tests-pypy3``, found by ``scripts/find-python`` (pyenv's versions and
``PATH``; nothing is downloaded). Each installs takeover with its test,
twisted and framework (aiohttp, uvicorn, websockets) extras, editable, into a
venv of its own under ``.nox/`` and runs pytest there. An interpreter the
machine does not have is skipped with the reason printed, or fails the run
where ``CI`` is set, as nox does for a missing interpreter.

``make matrix`` runs every session but the one of ``.venv``'s interpreter,
whose whole suite ``make test`` runs. The sessions at both ends of the range
(3.9 and 3.13) run the whole suite too; the others (3.10, 3.12 and PyPy,
whose end-to-end tests take twice CPython's time) leave out the tests marked
``slow``, and say so, so that CI stays short: ``MATRIX=full`` runs them
everywhere. Arguments after ``--`` go to pytest instead.
"""

from __future__ import annotations

import os
import sys
import time

import nox

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # harness/, which loads scripts/find-python as a module
from harness import find_python as _find_python  # noqa: E402

find_python = _find_python.load()

nox.options.default_venv_backend = "venv"  # the interpreter's own venv module
nox.options.download_python = "never"  # no network here but package registries
nox.options.error_on_external_run = True
nox.options.reuse_venv = "yes"  # pip brings a kept venv up to pyproject's pins

# The interpreter nox itself runs on: .venv's, tested by `make test`.
DEFAULT = f"{sys.version_info[0]}.{sys.version_info[1]}"
if sys.implementation.name == "pypy":
    DEFAULT = "pypy3"


# The oldest and the newest CPython supported run the whole suite.
ENDS = (find_python.CPYTHONS[0], find_python.CPYTHONS[-1])


def _tests(session: nox.Session) -> None:
    """Install takeover with its test extras and run the test suite."""
    started = time.monotonic()
    session.run(
        "python",
        "-c",
        "import sys, platform; print(platform.python_implementation(), "
        "platform.python_version(), sys.executable)",
    )
    session.install("--quiet", "-e", ".[test,twisted,aiohttp,uvicorn,websockets,ws,uvloop]")
    # As `make bytecode` does for .venv: compiled once, not by every process.
    session.run("python", "-m", "compileall", "-q", "src/takeover", "examples", "benchmarks")
    args = list(session.posargs)
    spec = session.name.split("-", 1)[1]
    if not args and spec not in ENDS and os.environ.get("MATRIX") != "full":
        session.log(
            f"{session.name}: the tests marked slow (end-to-end) are left out here to keep "
            f"CI short; they run on {' and '.join(ENDS)} and under `make test` "
            "(MATRIX=full runs them here too)"
        )
        args = ["-m", "not slow"]
    pytest_started = time.monotonic()
    session.run("python", "-m", "pytest", *args)
    now = time.monotonic()
    session.log(
        f"{session.name}: pytest {now - pytest_started:.0f} s, "
        f"session {now - started:.0f} s (wall time)"
    )


def _missing(reason: str):  # type: ignore[no-untyped-def]
    def session_function(session: nox.Session) -> None:
        if os.environ.get("CI"):
            session.error(reason)
        session.skip(reason)

    session_function.__doc__ = f"Not run: {reason}."
    return session_function


SESSIONS = []
for _text in find_python.ALL:
    _spec = find_python.parse(_text)
    _name = f"tests-{_text}"
    _path = find_python.find(_spec)
    if _path is None:
        _reason = f"no {_spec.label} on this machine (looked in {find_python.where(_spec)})" + (
            ": run `make interpreters`" if _spec.implementation == "pypy" else ""
        )
        nox.session(name=_name, python=False, venv_backend="none")(_missing(_reason))
    else:
        nox.session(name=_name, python=_path)(_tests)
    if _text != DEFAULT:
        SESSIONS.append(_name)

nox.options.sessions = SESSIONS
