"""What a recipient agrees to rebuild from an originator's pickle.

Unpickling runs whatever callable the pickle names. A recipient therefore
resolves every global in the graph through :class:`UnpicklePolicy`, which
accepts only:

* a short, vetted list of constructors and value types: copyreg's
  reconstructors, the builtin containers and scalars, builtin exceptions,
  ``collections``, ``datetime``, ``decimal``, ``fractions``, ``uuid``,
  ``ipaddress``, ``pathlib``, ``functools.partial``, ``re._compile``,
  ``types.SimpleNamespace``, asyncio's protocol base classes, and takeover's
  own reconstructors (modules by name, bound methods by name);
* exception and enum classes of the standard library (their constructors
  only store values);
* classes of the application: the originator's script (``__main__``), the
  migratable transports, servers and ports of the runtimes imported here
  (each registers its graph modules, see ``runtimes``), takeover's errors
  (not its machinery: no unpickler, policy or session can be built from a
  graph), and any module given with ``--allow``
  (``--allow myapp`` allows ``myapp`` and ``myapp.*``). Functions too, from
  the script and ``--allow`` modules, since a protocol factory may be one:
  allowing a module means trusting all of its code. zope.interface
  interfaces of those modules too (a Twisted ``Portal`` keys its checkers by
  them); they are looked up in their module like a class.

Everything else is refused, naming the global: ``os.system`` (which pickles
as ``posix.system``), ``builtins.eval``, ``exec``, ``getattr``,
``__import__``, ``subprocess.*``, ``importlib.*``, ``pickle.loads``,
``operator.methodcaller``, ``ctypes``... and any class of a module not allowed.
Instances are rebuilt with ``cls.__new__`` and ``__setstate__`` (or a
``__dict__`` update), so an allowed class is the only code that runs.

Modules are imported only when they are already imported, allowed, or part of
the standard library (less the few with import side effects), and a global is
looked up in a module's namespace, never through ``__getattr__`` or a dunder
attribute.

``UnpicklePolicy(trust=True)`` (``--trust``) turns all of this off.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import logging
import os
import site
import sys
import types
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import runtimes
from .errors import MigrationRefusedError

log = logging.getLogger("takeover.policy")

TRUST_WARNING = (
    "the unpickling policy is off (--trust): the originator's graph may run any code "
    "in this process; use it only with an originator you trust as much as your own code"
)

# Standard library modules whose import does something (opens a browser,
# prints, starts IDLE, runs the regression tests...).
_NO_IMPORT = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "turtledemo",
        "turtle",
        "tkinter",
        "test",
        "__hello__",
        "__phello__",
        "lib2to3",
    }
)

# The core's modules whose classes travel in graphs (its errors). The
# runtimes register theirs (see ``runtimes``). Not the machinery (the
# unpickler, the policy, sessions, channels, the command line): a graph that
# could build those could unpickle with the policy off. Not the demo shell
# either: its graphs carry code (functions as source, a console that runs what
# it is given), so its recipients take it with --allow takeover.demo.
_CORE_GRAPH_MODULES = frozenset({"takeover._core.errors", "takeover._core.registry"})
# takeover's protocols whose connections travel in graphs (an optional extra:
# imported when a graph names them, which fails with the extra's name if it is
# not installed here). Their classes rebuild their state in __setstate__ from
# builtins only.
_PROTOCOL_GRAPH_MODULES = frozenset({"takeover.websocket._protocol", "takeover.websocket._deflate"})

# Builtin methods are rebuilt only on these exact types (``self.lines.append``).
_CONTAINERS = ("builtins.list", "builtins.dict", "builtins.set", "builtins.bytearray")

_VETTED_NAMES: dict[str, tuple[str, ...]] = {
    "copyreg": ("_reconstructor", "__newobj__", "__newobj_ex__"),
    "builtins": (
        "object",
        "bool",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "list",
        "tuple",
        "dict",
        "set",
        "frozenset",
        "slice",
        "range",
        "Ellipsis",
        "NotImplemented",
    ),
    "collections": ("OrderedDict", "deque", "defaultdict", "Counter"),
    "datetime": ("date", "time", "datetime", "timedelta", "timezone"),
    "decimal": ("Decimal",),
    "fractions": ("Fraction",),
    "uuid": ("UUID",),
    "ipaddress": (
        "IPv4Address",
        "IPv6Address",
        "IPv4Network",
        "IPv6Network",
        "IPv4Interface",
        "IPv6Interface",
    ),
    "pathlib": ("PurePath", "PurePosixPath", "Path", "PosixPath"),
    "functools": ("partial",),
    "re": ("_compile",),
    "types": ("SimpleNamespace",),
}
# Vetted only if the application already imported them (no event loop here).
_VETTED_IF_IMPORTED: dict[str, tuple[str, ...]] = {
    "asyncio.protocols": ("BaseProtocol", "Protocol", "BufferedProtocol", "DatagramProtocol"),
}

# takeover's own reconstructors, registered by the module that defines them.
_registered: dict[int, object] = {}
_VETTED_MODULES = frozenset({"takeover._core.pickling"})


def vet(*functions: object) -> None:
    """Add takeover reconstructors (``pickling._import_module``...) to the vetted list.

    Only ``pickling``'s are vetted for every graph. Another module's
    reconstructors (the demo shell's, which compile code) are accepted only
    where that module is allowed (``--allow``), like any application function.
    """
    for function in functions:
        if getattr(function, "__module__", None) in _VETTED_MODULES:
            _registered[id(function)] = function


@cache
def _vetted() -> dict[int, object]:
    found: dict[int, object] = {}
    for module_name, names in _VETTED_NAMES.items():
        module = importlib.import_module(module_name)
        for name in names:
            obj = vars(module)[name]
            found[id(obj)] = obj
    for container in (list, dict, set, bytearray):
        found[id(container)] = container
    return found


def _is_vetted(obj: object) -> bool:
    if id(obj) in _vetted() or id(obj) in _registered:
        return True
    for module_name, names in _VETTED_IF_IMPORTED.items():
        module = sys.modules.get(module_name)
        if module is not None and any(vars(module).get(name) is obj for name in names):
            return True
    return False


@cache
def stdlib_names() -> frozenset[str]:
    """Top-level names of the standard library's modules."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return frozenset(names)
    # Python 3.9: what lives in the standard library's directories.
    found = set(sys.builtin_module_names)
    import sysconfig

    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)
    paths = sysconfig.get_paths()
    for directory in {paths["stdlib"], paths["platstdlib"]}:
        for sub in (directory, os.path.join(directory, "lib-dynload")):
            try:
                entries = os.listdir(sub)
            except OSError:
                continue
            for entry in entries:
                if entry in ("site-packages", "dist-packages"):
                    continue
                for suffix in suffixes:
                    if entry.endswith(suffix):
                        found.add(entry[: -len(suffix)])
                        break
                else:
                    if os.path.isfile(os.path.join(sub, entry, "__init__.py")):
                        found.add(entry)
    return frozenset(found)


@cache
def _installed_dirs() -> tuple[str, ...]:
    """Where installed code lives: the standard library and site-packages."""
    import sysconfig  # (once: the result is cached)

    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # a virtualenv's old site.py
        pass
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _installed(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(directory) for directory in _installed_dirs())


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _under(module: str, prefixes: Collection[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _stdlib(module: str) -> bool:
    return module.partition(".")[0] in stdlib_names()


def _name(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", type(obj).__name__))


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


@dataclass(frozen=True)
class UnpicklePolicy:
    """Which globals a recipient lets a pickle name.

    Args:
        allow: more modules of the application whose classes and functions
            the graph may name; each entry allows the module and its
            submodules (``"myapp"`` allows ``myapp.models``).
        trust: turn every check off: the originator may run any code here.
    """

    allow: tuple[str, ...] = ()
    trust: bool = False

    def __post_init__(self) -> None:
        allow = (self.allow,) if isinstance(self.allow, str) else tuple(self.allow)
        for name in allow:
            if not _dotted(name):
                raise ValueError(
                    f"--allow takes a module name like myapp or myapp.models: {name!r}"
                )
        object.__setattr__(self, "allow", allow)

    def prepare(self) -> None:
        """Import the vetted modules (datetime, decimal, uuid...) and find where
        installed code lives (``sysconfig``, for the script check) now, not
        while a service is paused: a recipient calls this when its session
        opens, and a recipient started ahead of its move may call it before
        (about 20 ms of CPU on CPython 3.11, which would otherwise share the
        CPU with the service being moved). (Not done on construction: a
        process that never unpickles, an originator, would pay for them in
        its start-up.)"""
        if not self.trust:
            _vetted()
            _installed_dirs()

    # -- modules ------------------------------------------------------------------

    def application(self, module: str, app: Collection[str] = ()) -> bool:
        """``module`` holds classes a graph may name: the runtime's, ``--allow``'s, the script's."""
        return (
            module in _CORE_GRAPH_MODULES
            or module in _PROTOCOL_GRAPH_MODULES
            or runtimes.is_graph_module(module)
            or self.allowed(module, app)
        )

    def allowed(self, module: str, app: Collection[str] = ()) -> bool:
        """``module`` is the originator's script or given with ``--allow``."""
        return module in app or _under(module, self.allow)

    def may_import(self, module: str, app: Collection[str] = ()) -> bool:
        """Whether resolving a global may import ``module`` (or find it imported)."""
        if self.trust:
            return True
        if not _dotted(module):
            return False
        if module in sys.modules or self.application(module, app):
            return True
        parts = module.split(".")
        return _stdlib(module) and parts[0] not in _NO_IMPORT and "__main__" not in parts

    def check_module(self, module: str, app: Collection[str] = ()) -> None:
        """Refuse a module reference the graph may not import."""
        if not self.may_import(module, app):
            raise MigrationRefusedError(
                f"refused module {module}: it is not imported here, not in the standard "
                f"library and not allowed; {self._hint(module)}"
            )

    def main_refusal(self, reference: str) -> str | None:
        """Why the originator's script ``reference`` may not be loaded (None: it may).

        Loading the script runs its top level, so a graph may not name
        installed code (the standard library, site-packages) as its script:
        that would let it pick any module to run and to trust. A script run
        with ``python -m`` from an installed package needs ``--allow``.
        """
        if self.trust:
            return None
        kind, _, target = reference.partition(":")
        if kind == "module":
            if not _dotted(target):
                return "it is not a module name"
            if self.allowed(target):
                return None
            if _under(target, ("takeover",)):
                return "takeover's own modules are not an application's script"
            top = target.partition(".")[0]
            if _stdlib(top):
                return "a standard library module is not an application's script"
            spec = importlib.util.find_spec(top) if top not in sys.modules else None
            origin = getattr(sys.modules.get(top), "__file__", None) or getattr(
                spec, "origin", None
            )
            if isinstance(origin, str) and _installed(origin):
                return (
                    f"{top} is installed code (take with --allow {top} if it is your application)"
                )
            return None
        if kind == "path":
            if not target.endswith(".py"):
                return "a script is a .py file"
            if _installed(target):
                return "it lies among installed code, not an application's script"
            try:
                st = os.stat(target)
            except OSError:
                return None  # load_main says what is wrong with it
            if st.st_uid not in (os.geteuid(), 0):
                return f"it belongs to uid {st.st_uid}, not to this user or root"
            if st.st_mode & 0o002:
                return "anyone may write to it"
            return None
        return None  # malformed: load_main says so

    # -- globals ------------------------------------------------------------------

    def check_global(self, module: str, name: str, obj: Any, app: Collection[str] = ()) -> None:
        """Accept ``obj``, found as ``module.name``, or raise naming it."""
        if self.trust or _is_vetted(obj):
            return
        cls = type(obj) if isinstance(obj, enum.Enum) else obj
        if isinstance(cls, type) and self._located(cls):
            home = cls.__module__
            if self.application(home, app):
                return
            if _stdlib(home) and issubclass(cls, (BaseException, enum.Enum)):
                return
        elif (
            isinstance(obj, _FUNCTIONS) and self._located(obj) and self.allowed(obj.__module__, app)
        ):
            return  # not takeover's own functions (its command line...) unless allowed by name
        elif (
            _is_interface(obj)
            and self.allowed(obj.__module__, app)
            and getattr(sys.modules.get(obj.__module__), "__dict__", {}).get(obj.__name__) is obj
        ):
            return  # a zope.interface declaration (a marker, like a class) of an allowed module
        raise self.refusal(f"{module}.{name}", module)

    def guards(self, cls: type, app: Collection[str] = ()) -> bool:
        """Whether a graph must leave ``cls`` as it found it (all but the app's classes)."""
        return not self.trust and not self.allowed(cls.__module__, app)

    def refusal(self, qualified: str, module: str | None = None) -> MigrationRefusedError:
        """The error for a global the graph may not name (``module``: where it lives)."""
        return MigrationRefusedError(
            f"refused {qualified}: not a vetted constructor nor a class of the application; "
            f"{self._hint(module or qualified)}"
        )

    def _hint(self, module: str) -> str:
        """What to do about a refused name from ``module``."""
        top = module.partition(".")[0]
        if _stdlib(top):
            return "if the originator is trusted, take with --trust to turn the check off"
        if top == "takeover":
            hint = _takeover_hint(module)
            if hint is not None:
                return hint
            # Allow as little of takeover as the name needs: never its machinery.
            top = "takeover.demo" if _under(module, ("takeover.demo",)) else module
        return (
            f"if {top} is your application's code, take with --allow {top} "
            "(or --trust to turn the check off)"
        )

    @staticmethod
    def _located(obj: Any) -> bool:
        """``obj`` really is what its ``__module__`` and ``__qualname__`` name."""
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        target: Any = module
        for part in str(getattr(obj, "__qualname__", "")).split("."):
            target = vars(target).get(part) if hasattr(target, "__dict__") else None
        return module is not None and target is obj

    # -- bound methods ----------------------------------------------------------------

    def method(
        self,
        owner: Any,
        name: str,
        app: Collection[str] = (),
        cache: dict[Any, str] | None = None,
    ) -> Any:
        """``owner.name``, if it is a method of a class the policy trusts.

        ``cache`` keeps the verdict on each class and name for one load (a
        graph may hold a bound method per connection).
        """
        if self.trust:
            return getattr(owner, name)
        is_class = isinstance(owner, type)
        cls = owner if is_class else type(owner)
        key = (cls, name, is_class)
        kind = cache.get(key) if cache is not None else None
        if kind is None:
            kind = self._method_kind(owner, cls, name, app)
            if cache is not None:
                cache[key] = kind
        if not is_class:
            state = getattr(owner, "__dict__", None)
            if isinstance(state, dict) and name in state:
                raise MigrationRefusedError(
                    f"refused bound method {_qualified(cls)}.{name}: the object's own "
                    "attribute, not a method of its class"
                )
        method = getattr(owner, name)
        if kind == "method" and isinstance(method, types.MethodType):
            if method.__self__ is owner or method.__self__ is cls:
                return method
        elif (
            kind == "builtin"
            and isinstance(method, types.BuiltinMethodType)
            and method.__self__ is owner
        ):
            return method
        raise MigrationRefusedError(
            f"refused bound method {_qualified(cls)}.{name}: not a method of the class"
        )

    def _method_kind(self, owner: Any, cls: type, name: str, app: Collection[str]) -> str:
        """``"method"`` or ``"builtin"``: what ``cls.name`` may be rebuilt as; else raise."""
        where = f"{_qualified(cls)}.{name}"
        if not isinstance(name, str) or not name.isidentifier() or _dunder(name):
            raise MigrationRefusedError(f"refused bound method {where}: not a method name")
        if isinstance(owner, types.ModuleType):
            raise self.refusal(f"{owner.__name__}.{name}", owner.__name__)
        is_class = isinstance(owner, type)
        static = _static_lookup(cls, name)
        trusted = self._trusted_class(cls, app)
        if trusted and (
            isinstance(static, classmethod)
            or (not is_class and isinstance(static, types.FunctionType))
        ):
            return "method"
        builtin = trusted or f"{cls.__module__}.{cls.__qualname__}" in _CONTAINERS
        if builtin and not is_class and isinstance(static, _METHOD_DESCRIPTOR):
            return "builtin"
        if trusted:
            raise MigrationRefusedError(f"refused bound method {where}: not a method of the class")
        raise MigrationRefusedError(
            f"refused bound method {where}: only methods of the application's classes "
            f"(or of builtin containers) are rebuilt; {self._hint(cls.__module__)}"
        )

    def _trusted_class(self, cls: type, app: Collection[str]) -> bool:
        # Not the vetted value types: pathlib.Path.unlink is a method too.
        return self._located(cls) and self.application(cls.__module__, app)


def _takeover_hint(module: str) -> str | None:
    """Why a graph names a module of takeover's that this recipient refuses, if known."""
    package = ".".join(module.split(".")[:2])
    if package == module.partition(".")[0] or package in sys.modules:
        return None
    if importlib.util.find_spec(package) is None:
        return (
            f"this takeover has no {package}: the originator runs another version of "
            "takeover; take with the same version on both sides"
        )
    runtime = package.partition(".")[2]
    if runtime.startswith("_") or runtime in ("demo", "cli"):
        return None
    return (
        f"it belongs to takeover's {runtime} runtime, which this recipient does not run: "
        f"take with --runtime {runtime}"
    )


_METHOD_DESCRIPTOR = type(list.append)
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def _is_interface(obj: Any) -> bool:
    """Whether ``obj`` is a zope.interface interface (Twisted names them in its graphs)."""
    kind = type(obj)
    return kind.__module__ == "zope.interface.interface" and kind.__name__ == "InterfaceClass"


def _static_lookup(cls: type, name: str) -> Any:
    """``name`` as the class defines it, without running a descriptor or ``__getattr__``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return None


def lookup(module: Any, name: str, policy: UnpicklePolicy) -> Any:
    """``module.name`` from namespaces only: no ``__getattr__``, no dunder past the first part.

    Raises:
        AttributeError: there is no such attribute.
        MigrationRefusedError: the path goes through a dunder attribute.
    """
    target = module
    for index, part in enumerate(name.split(".")):
        if index and _dunder(part) and not policy.trust:
            raise policy.refusal(f"{module.__name__}.{name}", module.__name__)
        namespace = getattr(target, "__dict__", None)
        if not isinstance(namespace, dict) and not isinstance(namespace, types.MappingProxyType):
            raise AttributeError(f"{_name(target)} has no attribute {part!r}")
        if part not in namespace:
            raise AttributeError(f"{_name(target)} has no attribute {part!r}")
        target = namespace[part]
    return target
