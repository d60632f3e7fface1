"""Other interpreters for the tests, found by ``scripts/find-python``.

The Makefile (the CPython 3.13 venv of the Twisted tests), ``noxfile.py``
(the matrix) and the tests all find interpreters with that one script.

What a machine lacks (an interpreter, a tool, a capability such as a systemd
namespace) skips a test on a developer's machine and fails it in CI
(:func:`skip_or_fail`).
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

from harness import find_python as _find_python

find_python = _find_python.load()


@functools.cache
def find(spec: str) -> str | None:
    """The path of the interpreter ``spec`` (``3.13``, ``pypy3``), or None."""
    return find_python.find(find_python.parse(spec))  # type: ignore[no-any-return]


def skip_or_fail(message: str) -> None:
    """Skip on a developer's machine; fail in CI, where the machine must provide everything."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def missing(what: str, how: str) -> None:
    """Skip on a developer's machine; fail in CI, where the Makefile provides ``what``."""
    skip_or_fail(f"{what} is not installed: {how}")


def require(spec: str) -> str:
    """The path of ``spec``; skips the test (fails it in CI) if the machine has none."""
    path = find(spec)
    if path is None:
        label = find_python.parse(spec).label
        if spec.startswith("pypy"):
            missing(label, "run `make interpreters` (Debian's pypy3)")
        else:
            missing(label, f"no {label} in pyenv or on PATH (see scripts/find-python)")
    assert path is not None
    return path


instance_values = pytest.mark.skipif(
    sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info < (3, 13),
    reason="CPython 3.11 and 3.12's instance values: before 3.11 every instance has a "
    "dict object, and on 3.13 a class under asyncio.BaseTransport's __slots__ gets no "
    "inline values, so every transport has one, the originator's as the twins (304 bytes "
    "each)",
)
"""For the tests that measure instance dicts: a platform limit, not a missing fix."""
