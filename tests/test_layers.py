"""The layers of the package, as docs/design.md draws them.

* ``takeover._core``, the sans-IO core, imports no runtime (``takeover.asyncio``,
  ``takeover.twisted``), no command line, no demo, and no event loop;
* its ``protocol`` module touches no socket, pickle or event loop at all;
* a runtime imports neither the command line nor the demo; the asyncio runtime
  does not import the Twisted one.

Checked twice: statically, on every import statement (and every
``importlib.import_module``/``__import__`` of a literal name) in the source,
wherever it stands in a module; and by importing the core in a fresh
interpreter and looking at what got imported.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from harness.procs import ROOT

PACKAGE = os.path.join(ROOT, "src", "takeover")


def modules_under(relative: str) -> list[str]:
    """The dotted names of the modules in ``src/takeover/RELATIVE`` (a file or a package)."""
    path = os.path.join(PACKAGE, relative)
    files = (
        [path]
        if path.endswith(".py")
        else sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".py"))
    )
    names = []
    for file in files:
        dotted = os.path.relpath(file, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
        names.append(dotted.removesuffix(".__init__"))
    return names


def source_of(module: str) -> tuple[str, bool]:
    """The path of ``module``'s source and whether it is a package's ``__init__``."""
    base = os.path.join(os.path.dirname(PACKAGE), *module.split("."))
    if os.path.isdir(base):
        return os.path.join(base, "__init__.py"), True
    return base + ".py", False


def imports_of(module: str) -> Iterator[str]:
    """Every module name ``module`` imports, resolved to an absolute dotted name."""
    path, is_package = source_of(module)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # ``from . import asyncio`` imports a module too.
            yield from (f"{target}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            yield node.args[0].value


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


ABOVE_THE_CORE = ("takeover.asyncio", "takeover.twisted", "takeover.cli", "takeover.demo")
EVENT_LOOPS = ("asyncio", "twisted", "uvloop")


@pytest.mark.parametrize("module", modules_under("_core"))
def test_the_core_imports_no_runtime_cli_demo_or_event_loop(module):
    """No core module imports a runtime, the command line, the demo or an event loop."""
    bad = [name for name in imports_of(module) if under(name, ABOVE_THE_CORE + EVENT_LOOPS)]
    assert not bad, f"{module} imports {bad}"


def test_the_protocol_does_no_io():
    """The conversation's machine touches no socket, pickle, selector or event loop."""
    io = ("socket", "_socket", "select", "selectors", "pickle", "asyncio", "twisted")
    bad = [name for name in imports_of("takeover._core.protocol") if under(name, io)]
    assert not bad, f"takeover._core.protocol imports {bad}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("asyncio", ("takeover.cli", "takeover.demo", "takeover.twisted")),
        ("twisted", ("takeover.cli", "takeover.demo")),
    ],
)
def test_a_runtime_imports_neither_the_cli_nor_the_demo(package, forbidden):
    """The runtimes sit below the command line and the demo (and asyncio below Twisted)."""
    for module in modules_under(package):
        bad = [name for name in imports_of(module) if under(name, forbidden)]
        assert not bad, f"{module} imports {bad}"


def test_the_static_check_sees_relative_and_dynamic_imports(tmp_path, monkeypatch):
    """The checker itself: a relative import of a runtime and an import_module are both seen."""
    package = tmp_path / "takeover"
    (package / "_core").mkdir(parents=True)
    (package / "_core" / "bad.py").write_text(
        "import importlib\n"
        "def f():\n"
        "    from .. import asyncio\n"
        "    return importlib.import_module('takeover.demo.shell')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(package))
    found = set(imports_of("takeover._core.bad"))
    assert {"takeover.asyncio", "takeover.demo.shell"} <= found


def test_importing_the_whole_core_loads_no_runtime():
    """In a fresh interpreter, every core module imported: no runtime, CLI, demo or loop."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules_under('_core')!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(PACKAGE)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert "takeover._core.originator" in out
    bad = [name for name in out if under(name, ABOVE_THE_CORE + EVENT_LOOPS)]
    assert not bad, f"importing the core imported {bad}"


def all_modules() -> list[str]:
    names = []
    for directory, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(directory, name), PACKAGE)
                names.append(relative)
    return sorted(names)


@pytest.mark.parametrize("relative", all_modules())
def test_modules_and_functions_stay_small(relative):
    """No module in src/ is over 700 lines, no function over 80 (the house style)."""
    path = os.path.join(PACKAGE, relative)
    with open(path) as f:
        text = f.read()
    assert text.count("\n") <= 700, f"{relative} has {text.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(text, path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{relative}: functions over 80 lines: {long}"
