"""``scripts/find-python`` as a module, for the noxfile and the tests.

The script is the one search for interpreters (pyenv's versions, ``PATH``)
that the Makefile runs as a command; this loads the same file, so that there
is nothing to keep in step.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load() -> ModuleType:
    """The script ``scripts/find-python``, loaded as the module ``find_python``."""
    path = os.path.join(ROOT, "scripts", "find-python")
    loader = importlib.machinery.SourceFileLoader("find_python", path)
    spec = importlib.util.spec_from_loader("find_python", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
