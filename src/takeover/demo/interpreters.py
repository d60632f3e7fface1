"""Other Python interpreters on this machine that can run ``takeover take``.

takeover needs nothing outside the standard library, so any interpreter of
Python 3.9 or later runs it with takeover's own directory on ``PYTHONPATH``
(:func:`environment`). :func:`find` looks in the usual places: ``pypy3`` and
``python3.N`` on ``PATH`` (pyenv's shims excepted: they need a pyenv version
selected) and every version pyenv installed (``$PYENV_ROOT/versions``, by
default ``~/.pyenv/versions``), asks each what it is, and keeps the ones that
import takeover. The demo and the tests both use it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import takeover

MINIMUM = (3, 9)

_PROBE = (
    "import os, sys, platform, takeover.cli; "
    "print(sys.implementation.name, platform.python_version(), "
    "os.path.realpath(sys.executable))"
)


@dataclass(frozen=True)
class Interpreter:
    """An interpreter that can run takeover."""

    path: str
    implementation: str  # "cpython", "pypy", ...
    version: tuple[int, int, int]
    real: str  # the executable with symlinks resolved

    @property
    def label(self) -> str:
        name = {"cpython": "CPython", "pypy": "PyPy"}.get(self.implementation, self.implementation)
        return f"{name} {'.'.join(map(str, self.version))}"


def source_root() -> str:
    """The directory that holds the ``takeover`` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(takeover.__file__)))


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which any interpreter imports this takeover."""
    env = dict(os.environ if base is None else base)
    parts = [source_root(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _candidates() -> list[str]:
    paths: list[str] = []
    names = ["pypy3", *[f"python3.{minor}" for minor in range(MINIMUM[1], 20)]]
    for name in names:
        found = shutil.which(name)
        if found and f"{os.sep}shims{os.sep}" not in found:
            paths.append(found)
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    paths += sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python3")))
    paths += sorted(glob.glob(os.path.join(root, "versions", "pypy3*", "bin", "pypy3")))
    unique: dict[str, None] = {}
    for path in paths:
        unique.setdefault(path, None)
    return list(unique)


def probe(paths: list[str], timeout: float = 20.0) -> list[Interpreter]:
    """Ask each interpreter (all at once) what it is; drop those that fail."""
    env = environment()
    running = []
    for path in paths:
        try:
            proc = subprocess.Popen(
                [path, "-c", _PROBE],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
            )
        except OSError:
            continue
        running.append((path, proc))
    found: list[Interpreter] = []
    for path, proc in running:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            continue
        fields = out.split()
        if proc.returncode != 0 or len(fields) != 3:
            continue
        try:
            numbers = [int(part) for part in fields[1].split(".")[:3] if part.isdigit()]
        except ValueError:
            continue
        if len(numbers) < 2:
            continue
        version = (numbers[0], numbers[1], numbers[2] if len(numbers) > 2 else 0)
        if version[:2] < MINIMUM:
            continue
        found.append(Interpreter(path, fields[0], version, fields[2]))
    return found


def current() -> Interpreter:
    """The interpreter running this code."""
    info = sys.version_info
    return Interpreter(
        sys.executable,
        sys.implementation.name,
        (info.major, info.minor, info.micro),
        os.path.realpath(sys.executable),
    )


def find() -> list[Interpreter]:
    """Every other interpreter found, newest version first (one per executable).

    "Other" means another executable than the running one; an interpreter of
    the same implementation and version elsewhere counts as the same.
    """
    me = current()
    seen = {me.real, (me.implementation, me.version)}
    result = []
    for interpreter in sorted(probe(_candidates()), key=lambda i: i.version, reverse=True):
        key = (interpreter.implementation, interpreter.version)
        if interpreter.real in seen or key in seen:
            continue
        seen.update((interpreter.real, key))
        result.append(interpreter)
    return result


def _guess(path: str) -> tuple[int, ...]:
    """The version a path suggests (``versions/3.13.0/``, ``python3.12``), or ()."""
    match = re.search(r"(?:versions/|python)(\d+)\.(\d+)(?:\.(\d+))?", path)
    if match is None:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def route() -> list[Interpreter]:
    """:func:`choose` of :func:`find`, asking only the interpreters it may pick.

    The newest other CPython by the version its path suggests and any PyPy
    are asked; if the CPython does not answer, every candidate is.
    """
    me = current()
    candidates = _candidates()
    cpythons = [
        path
        for path in candidates
        if "pypy" not in os.path.basename(path)
        and _guess(path)
        and _guess(path)[:2] != me.version[:2]
    ]
    cpythons.sort(key=_guess, reverse=True)
    pypys = [path for path in candidates if "pypy" in os.path.basename(path)]
    asked = probe(cpythons[:1] + pypys)
    if cpythons and not any(i.path == cpythons[0] for i in asked):
        return choose(find())
    asked = [i for i in asked if (i.implementation, i.version) != (me.implementation, me.version)]
    return choose(sorted(asked, key=lambda i: i.version, reverse=True))


def choose(found: list[Interpreter]) -> list[Interpreter]:
    """The demo's route: the newest other interpreter, then PyPy if that was not it."""
    if not found:
        return []
    route = [found[0]]
    pypy = [i for i in found if i.implementation == "pypy"]
    if pypy and found[0].implementation != "pypy":
        route.append(pypy[0])
    return route
