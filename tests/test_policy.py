"""Safe unpickling: a graph may name only vetted constructors and the application's classes."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import functools
import http
import importlib
import ipaddress
import json
import logging
import operator
import os
import pathlib
import pickle
import re
import signal
import socket
import subprocess
import sys
import textwrap
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness.echo import echo
from harness.procs import APPS, PYTHON, Proc, takeover
from harness.waiting import wait_until
from services import run_app
from takeover import MigrationRefusedError
from takeover._core.pickling import _bound_method, _import_module, dumps, loads
from takeover._core.policy import UnpicklePolicy
from takeover._core.recipient import RecipientSession

APP = UnpicklePolicy(allow=(__name__,))
"""This module's classes stand for the application's."""


class Call:
    """Pickles as ``func(*args)``: how a hostile graph makes the recipient call something."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)

    def __call__(self) -> None:
        """Callable, so that pickle accepts a Call as another Call's function."""


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Thing:
    """An application object with the kinds of method a graph refers to."""

    def __init__(self, name: str = "thing") -> None:
        self.name = name
        self.lines: list[str] = []
        self.calls = 0

    def hello(self) -> str:
        return f"hello {self.name}"

    def _tick(self) -> int:
        self.calls += 1
        return self.calls

    @classmethod
    def make(cls) -> Thing:
        return cls("made")

    @property
    def expensive(self) -> str:
        raise AssertionError("a property must not run while unpickling")


def make_thing(name: str) -> Thing:
    """A module-level factory function of the application."""
    return Thing(name)


@pytest.fixture
def marker(tmp_path) -> str:
    """A file that exists only if something the graph named has run."""
    return str(tmp_path / "MARKER")


@pytest.fixture
def module_dir(tmp_path, monkeypatch) -> Iterator[str]:
    """A directory on sys.path for throwaway tk_* modules, forgotten at the end."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield str(tmp_path)
    for name in set(sys.modules) - before:
        if name.startswith("tk_"):
            del sys.modules[name]


def write_module(directory: str, name: str, source: str) -> None:
    with open(os.path.join(directory, f"{name}.py"), "w") as f:
        f.write(textwrap.dedent(source))
    importlib.invalidate_caches()


def refused(blob: bytes, qualified: str, **kwargs: Any) -> str:
    """Load ``blob``, expecting a refusal that names ``qualified``; return the message."""
    with pytest.raises(MigrationRefusedError, match=rf"refused {re.escape(qualified)}\b") as info:
        loads(blob, [], **kwargs)
    return str(info.value)


# -- what a hostile graph may not name --------------------------------------------


def _global(obj: Any) -> str:
    """The name a pickle gives ``obj``: its module and name."""
    return f"{obj.__module__}.{obj.__qualname__}"


def hostile_graphs(marker: str) -> list[tuple[str, bytes]]:
    """(global the recipient must refuse, graph that would create ``marker``) pairs."""
    touch = f"touch '{marker}'"
    inner = pickle.dumps(Call(os.system, touch))
    return [
        ("posix.system", b"cposix\nsystem\n(S'" + touch.encode() + b"'\ntR."),
        ("posix.system", dumps(Call(os.system, touch)).blob),
        ("builtins.eval", dumps(Call(eval, f"open({marker!r}, 'w').write('x')")).blob),
        ("builtins.exec", dumps(Call(exec, f"open({marker!r}, 'w').write('x')")).blob),
        ("builtins.getattr", dumps(Call(Call(getattr, os, "system"), touch)).blob),
        ("builtins.__import__", dumps(Call(__import__, "os")).blob),
        ("subprocess.Popen", dumps(Call(subprocess.Popen, ["touch", marker])).blob),
        ("subprocess.call", dumps(Call(subprocess.call, ["touch", marker])).blob),
        ("importlib.import_module", dumps(Call(importlib.import_module, "os")).blob),
        # Where the interpreter defines them: CPython's _pickle.loads and
        # operator.methodcaller are PyPy's pickle._loads and _operator.methodcaller.
        (_global(pickle.loads), dumps(Call(pickle.loads, inner)).blob),
        (_global(operator.methodcaller), dumps(Call(operator.methodcaller, "system", touch)).blob),
        ("os._wrap_close", b"cos\n_wrap_close\n(NNtR."),
    ]


@pytest.mark.parametrize("index", range(12))
def test_hostile_global_is_refused_by_name_and_nothing_runs(marker, index):
    """os.system, eval, exec, getattr, subprocess, importlib, pickle.loads...: refused, not run."""
    qualified, blob = hostile_graphs(marker)[index]
    message = refused(blob, qualified)
    assert "--trust" in message
    assert not os.path.exists(marker)


def test_trusted_graph_runs_what_it_names(marker):
    """With trust=True the policy is off: the same graph runs its command."""
    blob = dumps(Call(eval, f"open({marker!r}, 'w').close()")).blob
    assert loads(blob, [], policy=UnpicklePolicy(trust=True)) is None
    assert os.path.exists(marker)


def test_trust_is_logged_loudly(caplog):
    """A session that trusts its originator says so at warning level."""
    with caplog.at_level(logging.WARNING, logger="takeover.recipient"):
        session = RecipientSession(None, policy=UnpicklePolicy(trust=True))  # type: ignore[arg-type]
    assert session.policy.trust
    assert any(
        r.levelno == logging.WARNING and "unpickling policy is off" in r.getMessage()
        for r in caplog.records
    )


def test_class_of_a_module_not_allowed_is_refused_before_its_import(module_dir, marker):
    """A class of another module is refused by name; the module is not even imported."""
    write_module(
        module_dir,
        "tk_sidefx",
        f"""
        with open({marker!r}, "w"):
            pass

        class Widget:
            pass
        """,
    )
    blob = b"ctk_sidefx\nWidget\n)\x81."
    message = refused(blob, "tk_sidefx.Widget")
    assert "--allow tk_sidefx" in message
    assert "tk_sidefx" not in sys.modules
    assert not os.path.exists(marker)


def test_application_classes_are_refused_without_allow():
    """This test module's own classes are not allowed until --allow names the module."""
    blob = dumps(Thing()).blob
    message = refused(blob, f"{__name__}.Thing")
    assert f"--allow {__name__}" in message
    assert loads(blob, [], policy=APP).name == "thing"


def test_stdlib_class_that_is_not_a_value_is_refused():
    """A standard library class off the vetted list (a thread, a socket server) is refused."""
    refused(b"cthreading\nThread\n)\x81.", "threading.Thread")
    refused(b"csocketserver\nTCPServer\n)\x81.", "socketserver.TCPServer")
    refused(b"cbuiltins\ntype\n(S'X'\n)}tR.", "builtins.type")


def test_modules_with_import_side_effects_are_not_imported():
    """A module reference to antigravity or this is refused, and neither is imported."""
    for name in ("antigravity", "this", "idlelib.idle", "test.autotest", "json.__main__"):
        assert name not in sys.modules
        blob = dumps(Call(_import_module, name)).blob
        with pytest.raises(MigrationRefusedError, match=rf"refused module {re.escape(name)}:"):
            loads(blob, [])
        assert name not in sys.modules


def test_unimported_module_outside_the_stdlib_is_not_imported(module_dir, marker):
    """A module reference to code that is neither imported, stdlib nor allowed is refused."""
    write_module(module_dir, "tk_quiet", f"with open({marker!r}, 'w'):\n    pass\n")
    blob = dumps(Call(_import_module, "tk_quiet")).blob
    with pytest.raises(MigrationRefusedError, match=r"refused module tk_quiet: .*--allow tk_quiet"):
        loads(blob, [])
    assert not os.path.exists(marker)
    assert loads(blob, [], policy=UnpicklePolicy(allow=("tk_quiet",))).__name__ == "tk_quiet"
    os.unlink(marker)


class Patch:
    """Pickles as a module reference followed by BUILD with ``state``: new module globals."""

    def __init__(self, module: str, state: dict[str, Any]) -> None:
        self.module, self.state = module, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (_import_module, (self.module,), self.state)


@pytest.mark.parametrize("module", ["sys", "builtins", "takeover._core.policy", "json"])
def test_graph_cannot_rewrite_a_module(module):
    """BUILD on a module reference (new globals for builtins, the policy...) is refused."""
    target = importlib.import_module(module)
    blob = dumps(Patch(module, {"tk_patched": 1, "isinstance": bool})).blob
    with pytest.raises(MigrationRefusedError, match=rf"refused to change module {module}:"):
        loads(blob, [])
    assert "tk_patched" not in vars(target)
    assert vars(target).get("isinstance", isinstance) is isinstance
    assert type(target) is types.ModuleType


def test_module_references_are_plain_modules_after_the_load():
    """Modules are guarded only while the graph loads; their class is restored after."""
    loaded = loads(dumps([os, json, os]).blob, [])
    assert loaded == [os, json, os]
    assert all(type(module) is types.ModuleType for module in loaded)
    with pytest.raises(MigrationRefusedError):
        loads(dumps([os, Patch("os", {"tk_patched": 1})]).blob, [])
    assert type(os) is types.ModuleType
    assert not hasattr(os, "tk_patched")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("collections", "Counter"),
        ("takeover._core.registry", "Registry"),
        ("http", "HTTPStatus"),
    ],
)
def test_graph_cannot_rewrite_a_class_it_names(module, name):
    """BUILD's slot state on a takeover or standard library class is undone and refused."""
    cls = getattr(importlib.import_module(module), name)
    before = dict(vars(cls))
    # GLOBAL, then BUILD with (None, {"tk_patched": 1, "__repr__": 2}): setattr on the class.
    blob = f"c{module}\n{name}\n(N}}(S'tk_patched'\nI1\nS'__repr__'\nI2\nutb.".encode()
    with pytest.raises(MigrationRefusedError, match=rf"refused to change class {module}\.{name}:"):
        loads(blob, [])
    assert dict(vars(cls)) == before


def test_demo_shell_code_needs_allow(marker):
    """The demo console runs code it is given: not by default, only with --allow takeover.demo."""
    from takeover.demo.console import Console
    from takeover.demo.portable import function

    push = Call(Call(_bound_method, Console("x"), "push"), f"open({marker!r}, 'w').close()")
    blob = dumps(push).blob
    assert "--allow takeover.demo " in refused(blob, "takeover.demo.console")
    refused(b"ctakeover.demo.portable\nfunction\n.", "takeover.demo.portable.function")
    assert not os.path.exists(marker)
    assert loads(blob, [], policy=UnpicklePolicy(allow=("takeover.demo",))) == ""
    assert os.path.exists(marker)
    assert function.__module__ == "takeover.demo.portable"


def test_dunder_paths_are_not_walked():
    """A global may not reach through dunder attributes (``X.__init__.__globals__``)."""
    refused(b"ctakeover._core.pickling\nGraphUnpickler.__init__\n.", "takeover._core.pickling")
    refused(b"cos\n__builtins__\n.", "os.__builtins__")
    refused(b"ctakeover.cli\nmain\n.", "takeover.cli.main")


# -- what a legitimate graph is made of ---------------------------------------------


def test_values_of_the_standard_library_load():
    """Containers, numbers, dates, paths, addresses, patterns and enums load by default."""
    graph = {
        "set": {1, 2},
        "frozenset": frozenset({3}),
        "bytearray": bytearray(b"ab"),
        "complex": 1 + 2j,
        "range": range(3),
        "slice": slice(1, 2),
        "ordered": collections.OrderedDict(a=1),
        "deque": collections.deque([1, 2], maxlen=5),
        "default": collections.defaultdict(list, a=[1]),
        "counter": collections.Counter("aab"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 1, 2),
        "delta": datetime.timedelta(seconds=5),
        "decimal": decimal.Decimal("1.5"),
        "fraction": fractions.Fraction(1, 3),
        "uuid": uuid.UUID(int=7),
        "ip": ipaddress.ip_address("10.0.0.1"),
        "net": ipaddress.ip_network("fd00::/64"),
        "path": pathlib.Path("/tmp/x"),
        "pattern": re.compile(r"a+", re.IGNORECASE),
        "status": http.HTTPStatus.NOT_FOUND,
        "family": socket.AF_INET,
        "namespace": types.SimpleNamespace(a=1),
        "nothing": (None, Ellipsis, NotImplemented, True),
    }
    assert loads(dumps(graph).blob, []) == graph


def test_exceptions_load():
    """Builtin and standard library exceptions, and takeover's own, load by default."""
    graph = [
        ValueError("bad", 1),
        OSError(2, "gone"),
        ConnectionResetError(104, "reset"),
        json.JSONDecodeError("msg", "doc", 1),
        MigrationRefusedError("no"),
    ]
    loaded = loads(dumps(graph).blob, [])
    assert [type(e) for e in loaded] == [type(e) for e in graph]
    assert [e.args for e in loaded] == [e.args for e in graph]


def test_module_references_load():
    """Modules already imported (os, sys, json) and stdlib ones travel by name."""
    graph = {"os": os, "sys": sys, "json": json, "path": os.path}
    assert loads(dumps(graph).blob, []) == graph
    blob = dumps(Call(_import_module, "colorsys")).blob
    assert loads(blob, []) is sys.modules["colorsys"]


def test_socket_slot_loads():
    """A socket in the graph comes back around the descriptor that travelled."""
    a, b = socket.socketpair()
    with a, b:
        dumped = dumps({"sock": a})
        loaded = loads(dumped.blob, [os.dup(a.fileno())])
        with loaded["sock"] as copy:
            copy.sendall(b"ping")
            assert b.recv(4) == b"ping"


def test_application_graph_with_methods_enums_and_functions_loads():
    """App objects, their methods (public, private, class), enums and functions load."""
    thing = Thing("app")
    graph = {
        "thing": thing,
        "hello": thing.hello,
        "tick": thing._tick,
        "make": Thing.make,
        "append": thing.lines.append,
        "color": Color.GREEN,
        "factory": make_thing,
        "partial": functools.partial(make_thing, "later"),
    }
    loaded = loads(dumps(graph).blob, [], policy=APP)
    assert loaded["hello"]() == "hello app"
    assert loaded["hello"].__self__ is loaded["thing"]
    assert loaded["tick"]() == 1 and loaded["thing"].calls == 1
    assert loaded["make"]().name == "made"
    loaded["append"]("line")
    assert loaded["thing"].lines == ["line"]
    assert loaded["color"] is Color.GREEN
    assert loaded["factory"] is make_thing
    assert loaded["partial"]().name == "later"


def test_bound_methods_travel_without_getattr():
    """A bound method pickles as takeover's _bound_method, never as builtins.getattr."""
    blob = dumps(Thing().hello).blob
    assert b"_bound_method" in blob
    assert b"getattr" not in blob


def test_bound_method_rebuilt_only_on_trusted_classes():
    """_bound_method refuses dunders, modules, shadowing state and classes not allowed."""
    thing = Thing()
    thing.__dict__["hello"] = "state, not a method"
    path_class = _global(pathlib.PosixPath)
    cases = [
        (Thing(), "__init__", "not a method name"),
        (Thing(), "expensive", f"{__name__}.Thing.expensive"),
        (thing, "hello", f"{__name__}.Thing.hello"),
        (os, "system", "refused os.system"),
        (collections.Counter("a"), "update", "refused bound method collections.Counter.update"),
        # pathlib.PosixPath is pathlib._local.PosixPath from 3.13 on.
        (pathlib.Path("/nonexistent"), "unlink", f"refused bound method {path_class}.unlink"),
        (subprocess.Popen, "wait", "refused subprocess.Popen"),
    ]
    for owner, name, expected in cases:
        blob = dumps(Call(_bound_method, owner, name)).blob
        with pytest.raises(MigrationRefusedError, match=re.escape(expected)):
            loads(blob, [], policy=APP)
    # Only the app's classes: the default policy refuses Thing itself first.
    refused(dumps(Thing().hello).blob, f"{__name__}.Thing")


def test_bound_method_pickled_with_getattr_is_refused():
    """A bound method pickled by plain pickle (getattr) is refused naming builtins.getattr."""
    refused(pickle.dumps(Thing().hello), "builtins.getattr", policy=APP)


# -- --allow, and the originator's script -------------------------------------------


def test_allow_widens_to_a_module_and_its_submodules(module_dir):
    """--allow tk_pkg allows tk_pkg.sub's classes and functions, not tk_pkgx's."""
    os.mkdir(os.path.join(module_dir, "tk_pkg"))
    write_module(module_dir, "tk_pkg/__init__", "")
    write_module(module_dir, "tk_pkg/sub", "class Model:\n    pass\n\ndef build():\n    pass\n")
    write_module(module_dir, "tk_pkgx", "class Model:\n    pass\n")
    model = b"ctk_pkg.sub\nModel\n)\x81."
    function = b"ctk_pkg.sub\nbuild\n."
    other = b"ctk_pkgx\nModel\n)\x81."
    refused(model, "tk_pkg.sub.Model")
    allow = UnpicklePolicy(allow=("tk_pkg",))
    assert type(loads(model, [], policy=allow)).__qualname__ == "Model"
    assert loads(function, [], policy=allow).__name__ == "build"
    refused(other, "tk_pkgx.Model", policy=allow)


def test_allow_takes_module_names_only():
    """An --allow value that is not a dotted module name is a ValueError."""
    for bad in ("", "my app", "a..b", "os/path"):
        with pytest.raises(ValueError, match="module name"):
            UnpicklePolicy(allow=(bad,))
    assert UnpicklePolicy(allow="myapp").allow == ("myapp",)  # type: ignore[arg-type]


def test_take_refuses_a_bad_allow_in_one_line(control, procs):
    """`take --allow 'not a module'` fails with one error line, before connecting."""
    bad = takeover("take", control, "--allow", "not a module")
    procs.append(bad)
    assert bad.wait() == 1, bad.output()
    assert re.fullmatch(r"takeover: error: --allow takes a module name[^\n]*", bad.output())


def test_script_may_not_be_installed_code():
    """A main reference naming the stdlib or site-packages is refused, not loaded."""
    stdlib = os.path.dirname(os.__file__)
    cases = [
        ("module:subprocess", "Popen"),
        ("module:antigravity", "x"),
        (f"path:{os.path.join(stdlib, 'antigravity.py')}", "x"),
        (f"path:{pytest.__file__}", "x"),
        ("module:_pytest.main", "x"),
    ]
    for main, name in cases:
        blob = f"c__main__\n{name}\n.".encode()
        with pytest.raises(MigrationRefusedError, match="refused to load the originator's script"):
            loads(blob, [], main=main)
    assert "antigravity" not in sys.modules


def test_script_anyone_may_write_is_not_loaded(tmp_path, monkeypatch):
    """A main script that others may write to is refused, and its top level does not run."""
    monkeypatch.setattr(sys, "path", [*sys.path])  # loading the script prepends its directory
    monkeypatch.setitem(sys.modules, "__takeover_main__", None)
    del sys.modules["__takeover_main__"]  # absent during the test, absent after it
    script = tmp_path / "app.py"
    marker = tmp_path / "ran"
    script.write_text(f"open({str(marker)!r}, 'w').close()\nclass App:\n    pass\n")
    script.chmod(0o666)
    with pytest.raises(MigrationRefusedError, match="anyone may write to it"):
        loads(b"c__main__\nApp\n)\x81.", [], main=f"path:{script}")
    assert not marker.exists()
    script.chmod(0o644)
    assert type(loads(b"c__main__\nApp\n)\x81.", [], main=f"path:{script}")).__name__ == "App"
    assert marker.exists()


def test_takeover_machinery_cannot_be_named():
    """A graph may not build takeover's unpickler, policy or session, nor call its functions."""
    for qualified in (
        "takeover._core.pickling.GraphUnpickler",
        "takeover._core.pickling.GraphLoad",
        "takeover._core.policy.UnpicklePolicy",
        "takeover._core.recipient.RecipientSession",
        "takeover._core.script.load_main",
        "takeover._core.hooks.run_hook",
        "takeover.asyncio.take_and_serve",
        "takeover.asyncio._migration.MigrationServer",
    ):
        module, _, name = qualified.rpartition(".")
        refused(f"c{module}\n{name}\n.".encode(), qualified)
    with pytest.raises(MigrationRefusedError, match="not an application's script"):
        loads(b"c__main__\nloads\n.", [], main="module:takeover._core.pickling")


def echo_args(*args: Any) -> tuple[Any, ...]:
    """An application function a graph may name (with ``allow=(__name__,)``)."""
    return args


def test_a_graph_cannot_make_a_function_receive_the_load():
    """Which reconstructors get the load in progress is takeover's list, not an attribute
    a graph's BUILD could set on a function it names."""
    module = __name__
    blob = (
        f"c{module}\necho_args\n}}S'_takeover_needs_load'\nI01\nsb0c{module}\necho_args\n(I5\ntR."
    ).encode()
    assert loads(blob, [], policy=UnpicklePolicy(allow=(module,))) == (5,)


def test_a_module_of_another_takeover_is_named_as_such():
    """A graph naming a takeover module this version lacks says the versions differ."""
    message = refused(b"ctakeover._aio_transport\nMigratableServer\n.", "takeover._aio_transport")
    assert "the originator runs another version of takeover" in message


def test_a_graph_of_a_runtime_not_running_here_names_the_runtime():
    """An asyncio recipient refusing a Twisted graph says to take it with --runtime twisted."""
    code = textwrap.dedent(
        """
        import sys
        import takeover.asyncio
        from takeover._core.pickling import loads
        try:
            loads(b"ctakeover.twisted._transport\\nMigratableTCPPort\\n.", [])
        except Exception as exc:
            print(exc)
        print("takeover.twisted" in sys.modules)
        """
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    message, imported = out.strip().splitlines()
    assert "it belongs to takeover's twisted runtime" in message
    assert "take with --runtime twisted" in message
    assert imported == "False"  # refusing it did not import the runtime


def test_prepare_does_ahead_what_a_take_would_import():
    """A recipient started ahead calls prepare() before its move: the vetted modules
    and sysconfig (where installed code lives) are loaded then, and a policy that
    trusts everything loads none of them."""
    code = textwrap.dedent(
        """
        import sys
        from takeover import UnpicklePolicy
        from takeover._core import policy
        wanted = ("datetime", "decimal", "uuid", "fractions", "pathlib", "sysconfig")
        print(sorted(m for m in wanted if m in sys.modules))
        UnpicklePolicy(trust=True).prepare()
        print(sorted(m for m in wanted if m in sys.modules))
        UnpicklePolicy().prepare()
        print(sorted(m for m in wanted if m in sys.modules))
        print(policy._installed_dirs.cache_info().currsize)
        """
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    before, trusting, prepared, cached = out.strip().splitlines()
    assert before == trusting == "[]"  # importing takeover loads none of them
    assert prepared == str(
        sorted(["datetime", "decimal", "uuid", "fractions", "pathlib", "sysconfig"])
    )
    assert cached == "1"


# -- end to end: a hostile originator and `takeover take` ---------------------------


def start_hostile(procs: list[Proc], port: int, control: str, payload: str, marker: str) -> Proc:
    proc = Proc(
        [
            PYTHON,
            os.path.join(APPS, "hostile.py"),
            *("--port", str(port), "--control", control),
            *("--payload", payload, "--marker", marker),
        ]
    )
    procs.append(proc)
    proc.expect(r"control")
    return proc


def service_state(procs: list[Proc], control: str) -> str:
    """The one service's state, as `takeover list --json` reports it."""
    listing = takeover("list", "--json", control)
    procs.append(listing)
    assert listing.wait() == 0, listing.output()
    return str(json.loads(listing.output())["state"])


@pytest.mark.parametrize(
    ("payload", "qualified"),
    [("system", "posix.system"), ("eval", "builtins.eval"), ("subprocess", "subprocess.call")],
)
def test_hostile_originator_is_refused_and_nothing_runs(
    control, workdir, free_port, procs, payload, qualified
):
    """A graph that calls os.system or eval: `take` fails naming it, nothing runs, no harm done."""
    marker = os.path.join(workdir, "MARKER")
    origin = start_hostile(procs, free_port, control, payload, marker)
    with socket.create_connection(("127.0.0.1", free_port), timeout=10) as client:
        assert echo(client, b"before\n") == b"before\n"
        recipient = takeover("take", control)
        procs.append(recipient)
        assert recipient.wait() == 1, recipient.output()
        output = recipient.output()
        assert re.fullmatch(r"takeover: error: [^\n]*", output), output
        assert f"refused {qualified}:" in output
        assert not os.path.exists(marker)
        # Rolled back: the originator serves on, its service available again.
        assert echo(client, b"after\n") == b"after\n"
        assert origin.popen.poll() is None
        wait_until(lambda: service_state(procs, control) == "available", what="the rollback")


def test_trusting_recipient_runs_the_payload_and_says_so(control, workdir, free_port, procs):
    """`take --trust` warns on stderr, and then the hostile graph does run: the flag matters."""
    marker = os.path.join(workdir, "MARKER")
    origin = start_hostile(procs, free_port, control, "eval", marker)
    recipient = takeover("take", "--trust", control)
    procs.append(recipient)
    recipient.expect(r"unpickling policy is off \(--trust\)")
    recipient.expect(r"^took evil: ")
    assert os.path.exists(marker)
    assert origin.wait() == 0, origin.output()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()


def test_private_module_needs_allow(control, workdir, free_port, procs):
    """A protocol class of a module both sides can import is refused until --allow names it."""
    directory = os.path.join(workdir, "private")
    os.mkdir(directory)
    write_module(
        directory, "tk_private", "import asyncio\n\nclass Proto(asyncio.Protocol):\n    pass\n"
    )
    env = {"PYTHONPATH": directory}
    origin = run_app(procs, free_port, control, "--protocol", "tk_private:Proto", env=env)
    refused_take = takeover("take", control, env=env)
    procs.append(refused_take)
    assert refused_take.wait() == 1, refused_take.output()
    assert "refused tk_private.Proto:" in refused_take.output()
    assert "--allow tk_private" in refused_take.output()
    recipient = takeover("take", control, "--allow", "tk_private", env=env)
    procs.append(recipient)
    recipient.expect(r"^took a: ")
    assert origin.wait() == 0, origin.output()
    recipient.signal(signal.SIGTERM)
    assert recipient.wait() == 0, recipient.output()
