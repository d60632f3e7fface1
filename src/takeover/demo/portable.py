"""A console namespace that survives a move to another interpreter.

What a user builds at the prompt does not pickle as it stands: functions and
classes defined there belong to no importable module, and bytecode differs
between interpreters (CPython 3.11, 3.13, PyPy). So a namespace is pickled
with these rules, every reconstructor a function of this module:

* a **module** travels by name and is imported again (:func:`module`);
* a **function defined at the prompt** travels as the source of the input
  that defined it, with its position there; the other side parses that
  source, finds the ``def`` (or ``lambda``), compiles it with its own
  compiler and sets the defaults, closure cells, attributes and qualified
  name from the pickled state (:func:`function`, :func:`set_function_state`).
  Decorators, defaults and annotations are not evaluated again: the object
  the namespace held is rebuilt, not the statement re-run, and rebuilding
  it runs none of the user's code;
* a **class defined at the prompt** is created empty with its bases and
  metaclass, then its attributes (methods included, rebuilt as above) are
  set (:func:`new_class`, :func:`set_class_state`);
* ``classmethod``, ``staticmethod`` and ``property`` wrap what they wrap;
* everything else pickles as usual.

Anything that cannot move (a generator, an open file, a lock, a function
whose source is unknown because ``exec`` made it) is named, with the reason,
in the :class:`pickle.PicklingError` that :func:`dumps` raises.

The blob is unpickled with takeover's own restricted unpickler, under the
policy of the graph it is part of (the reconstructors get the load in
progress, see ``takeover._core.pickling.needs_load``), so a recipient's
allowlist applies to it as to the rest of the graph.
"""

from __future__ import annotations
import __future__

import ast
import copy
import io
import linecache
import pickle
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

from .._core.pickling import GraphLoad, needs_load

SKIPPED = ("__builtins__",)
"""Namespace keys that never travel (``exec`` adds ``__builtins__`` again)."""


class _Empty:
    """Stands for an empty closure cell in pickled state."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (empty_cell, ())


_EMPTY = _Empty()


def empty_cell() -> _Empty:
    """Reconstructor: the empty-cell marker."""
    return _EMPTY


@needs_load
def module(load: GraphLoad, name: str) -> types.ModuleType:
    """Reconstructor: import a module by name (as the recipient's policy allows)."""
    return load.import_module(name)


def future_feature(name: str) -> object:
    """Reconstructor: a ``from __future__ import NAME`` binding."""
    if name not in __future__.all_feature_names:
        raise ValueError(f"no __future__ feature {name!r}")
    return getattr(__future__, name)


def classmethod_of(func: Any) -> classmethod[Any, Any, Any]:
    """Reconstructor for ``classmethod(func)``."""
    return classmethod(func)


def staticmethod_of(func: Any) -> staticmethod[Any, Any]:
    """Reconstructor for ``staticmethod(func)``."""
    return staticmethod(func)


def property_of(fget: Any, fset: Any, fdel: Any, doc: Any) -> property:
    """Reconstructor for ``property(fget, fset, fdel, doc)``."""
    return property(fget, fset, fdel, doc)


# -- functions ------------------------------------------------------------------

_FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _walk(
    node: ast.AST, classes: tuple[str, ...] = ()
) -> Iterator[tuple[ast.AST, tuple[str, ...]]]:
    """Every node below ``node`` with the names of the classes enclosing it."""
    for child in ast.iter_child_nodes(node):
        yield child, classes
        inner = (*classes, child.name) if isinstance(child, ast.ClassDef) else classes
        yield from _walk(child, inner)


def _first_line(node: ast.AST) -> int:
    decorators = getattr(node, "decorator_list", None)
    lines = [node.lineno] + [d.lineno for d in decorators or ()]  # type: ignore[attr-defined]
    return int(min(lines))


def _find(source: str, name: str, line: int) -> tuple[ast.AST, tuple[str, ...]]:
    """The function node named ``name`` that starts on ``line`` of ``source``."""
    tree = ast.parse(source)
    found = []
    for node, classes in _walk(tree):
        if not isinstance(node, _FUNCTION_NODES):
            continue
        node_name = "<lambda>" if isinstance(node, ast.Lambda) else node.name
        if node_name != name:
            continue
        if line in (node.lineno, _first_line(node)):
            found.append((node, classes))
    if len(found) != 1:
        where = "no" if not found else "more than one"
        raise pickle.PicklingError(f"{where} function {name!r} starts on line {line} of its input")
    return found[0]


def _strip(node: ast.AST) -> ast.AST:
    """A copy of a function node whose definition evaluates nothing.

    Decorators are dropped, defaults become None and annotations go: the
    values they had travel in the pickled state instead.
    """
    node = copy.deepcopy(node)
    args = node.args  # type: ignore[attr-defined]
    args.defaults = [ast.Constant(None) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(None) for d in args.kw_defaults]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list = []
        node.returns = None
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
            if arg is not None:
                arg.annotation = None
    return node


def _wrap(node: ast.AST, classes: tuple[str, ...], freevars: tuple[str, ...]) -> ast.Module:
    """A module whose ``__takeover_outer__()`` returns the rebuilt function.

    The function is defined inside a class of the same name as the innermost
    one that enclosed it (for private name mangling and the ``__class__``
    cell), inside a function that holds its other free variables as cells.
    """
    line = node.lineno  # type: ignore[attr-defined]
    stripped = _strip(node)
    body: list[ast.stmt]
    if isinstance(stripped, ast.Lambda):
        key = "__takeover_f__"
        body = [ast.Assign(targets=[ast.Name(key, ast.Store())], value=stripped)]
    else:
        key = stripped.name  # type: ignore[attr-defined]
        body = [stripped]  # type: ignore[list-item]
    fetch: ast.expr = ast.Name(key, ast.Load())
    in_class = bool(classes)
    if in_class:
        body = [_class(classes[-1], body)]
        # Class.__dict__[key]: a class body is no closure scope.
        fetch = ast.Subscript(
            value=ast.Attribute(ast.Name(classes[-1], ast.Load()), "__dict__", ast.Load()),
            slice=ast.Constant(key),
            ctx=ast.Load(),
        )
    cells: list[ast.stmt] = [
        ast.Assign(targets=[ast.Name(var, ast.Store())], value=ast.Constant(None))
        for var in freevars
        if not (in_class and var == "__class__")
    ]
    outer = ast.FunctionDef(
        name="__takeover_outer__",
        args=ast.arguments(
            posonlyargs=[],
            args=[],
            vararg=None,
            kwonlyargs=[],
            kw_defaults=[],
            kwarg=None,
            defaults=[],
        ),
        body=[*cells, *body, ast.Return(fetch)],
        decorator_list=[],
        returns=None,
    )
    if sys.version_info >= (3, 12):
        outer.type_params = []
    tree = ast.Module(body=[outer], type_ignores=[])
    _locate(tree, line)
    return tree


def _class(name: str, body: list[ast.stmt]) -> ast.ClassDef:
    made = ast.ClassDef(name=name, bases=[], keywords=[], body=body, decorator_list=[])
    if sys.version_info >= (3, 12):
        made.type_params = []
    return made


def _locate(tree: ast.AST, line: int) -> None:
    """Give the synthesized nodes a location (the user's nodes keep theirs)."""
    for node in ast.walk(tree):
        if "lineno" in node._attributes and not hasattr(node, "lineno"):
            node.lineno = line  # type: ignore[attr-defined]
            node.col_offset = 0  # type: ignore[attr-defined]
        if "end_lineno" in node._attributes and getattr(node, "end_lineno", None) is None:
            node.end_lineno = getattr(node, "lineno", line)  # type: ignore[attr-defined]
            node.end_col_offset = 0  # type: ignore[attr-defined]


# What the state setters may touch: only what the reconstructors here made.
_made_functions: weakref.WeakSet[types.FunctionType] = weakref.WeakSet()
_made_classes: weakref.WeakSet[type] = weakref.WeakSet()


def function(
    globals_: dict[str, Any],
    filename: str,
    source: str,
    line: int,
    name: str,
    freevars: tuple[str, ...],
) -> types.FunctionType:
    """Reconstructor: compile the function ``name`` from the input ``source``.

    ``line`` is where it starts in ``source`` (the function's
    ``co_firstlineno``); ``freevars`` are the names of its closure cells.
    The function's globals are ``globals_`` (the session's namespace, perhaps
    still being filled in); its state comes later (:func:`set_function_state`).
    """
    if not isinstance(globals_, dict):
        raise TypeError("a function's globals must be a dict")
    register_source(filename, source)
    node, classes = _find(source, name, line)
    code = compile(_wrap(node, classes, freevars), filename, "exec")
    scope: dict[str, Any] = {}
    exec(code, globals_, scope)
    made = scope["__takeover_outer__"]()
    if not isinstance(made, types.FunctionType):
        raise TypeError(f"rebuilding {name!r} gave {type(made).__name__}")
    _made_functions.add(made)
    return made


def set_function_state(func: types.FunctionType, state: dict[str, Any]) -> None:
    """State setter: defaults, closure, attributes and names of a rebuilt function."""
    if func not in _made_functions:
        raise TypeError("only a function rebuilt from source takes a function state")
    func.__defaults__ = state["defaults"]
    func.__kwdefaults__ = state["kwdefaults"]
    func.__annotations__ = state["annotations"] or {}
    func.__qualname__ = state["qualname"]
    func.__name__ = state["name"]
    func.__module__ = state["module"]
    func.__doc__ = state["doc"]
    func.__dict__.update(state["dict"] or {})
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or ()))
    for var, value in state["closure"].items():
        cell = cells.get(var)
        if cell is not None and value is not _EMPTY:
            cell.cell_contents = value


# -- classes --------------------------------------------------------------------

_CLASS_SKIP = ("__dict__", "__weakref__")


def new_class(
    metaclass: type | None, name: str, bases: tuple[type, ...], creation: dict[str, Any]
) -> type:
    """Reconstructor: an empty class; :func:`set_class_state` fills it."""
    meta = type if metaclass is None else metaclass
    if not (isinstance(meta, type) and issubclass(meta, type)):
        raise TypeError(f"a metaclass must be a subclass of type, not {meta!r}")
    made: type = meta(name, bases, dict(creation))
    _made_classes.add(made)
    return made


def set_class_state(cls: type, state: dict[str, Any]) -> None:
    """State setter: a rebuilt class's attributes."""
    if cls not in _made_classes:
        raise TypeError("only a class rebuilt here takes a class state")
    for key, value in state.items():
        setattr(cls, key, value)


# -- pickling -------------------------------------------------------------------


class _Pickler(pickle.Pickler):
    def __init__(
        self, file: io.BytesIO, protocol: int, sources: dict[str, str], module_name: str
    ) -> None:
        super().__init__(file, protocol)
        self.sources = sources
        self.module_name = module_name
        # id(the live namespace) -> the copy being pickled, without __builtins__.
        self.globals_map: dict[int, dict[str, Any]] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            name = obj.__name__
            if sys.modules.get(name) is not obj:
                raise pickle.PicklingError(
                    f"module {name!r} was not imported, so it cannot be imported again"
                )
            return (module, (name,))
        if isinstance(obj, types.FunctionType):
            return self._reduce_function(obj)
        if isinstance(obj, type):
            return self._reduce_class(obj)
        if isinstance(obj, type(__future__.annotations)):
            for name in __future__.all_feature_names:
                if getattr(__future__, name) is obj:
                    return (future_feature, (name,))
        if isinstance(obj, classmethod):
            return (classmethod_of, (obj.__func__,))
        if isinstance(obj, staticmethod):
            return (staticmethod_of, (obj.__func__,))
        if type(obj) is property:
            return (property_of, (obj.fget, obj.fset, obj.fdel, obj.__doc__))
        return NotImplemented

    def _reduce_function(self, func: types.FunctionType) -> Any:
        code = func.__code__
        source = self.sources.get(code.co_filename)
        if source is None:
            if func.__module__ == self.module_name:
                raise pickle.PicklingError(
                    f"function {func.__qualname__} was made by exec() or compile() "
                    f"({code.co_filename}), so its source is unknown"
                )
            return NotImplemented
        node_name = code.co_name
        _find(source, node_name, code.co_firstlineno)  # fail here, not on the other side
        closure = {
            var: _cell_value(cell) for var, cell in zip(code.co_freevars, func.__closure__ or ())
        }
        state = {
            "defaults": func.__defaults__,
            "kwdefaults": func.__kwdefaults__,
            "annotations": dict(func.__annotations__) or None,
            "qualname": func.__qualname__,
            "name": func.__name__,
            "module": func.__module__,
            "doc": func.__doc__,
            "dict": dict(func.__dict__) or None,
            "closure": closure,
        }
        args = (
            self.globals_map.get(id(func.__globals__), func.__globals__),
            code.co_filename,
            source,
            code.co_firstlineno,
            node_name,
            tuple(code.co_freevars),
        )
        return (function, args, state, None, None, set_function_state)

    def _reduce_class(self, cls: type) -> Any:
        if cls.__module__ != self.module_name:
            return NotImplemented
        attrs = dict(cls.__dict__)
        slots = attrs.get("__slots__")
        creation: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        if slots is not None:
            names = [slots] if isinstance(slots, str) else list(slots)
            creation["__slots__"] = tuple(names)
            for slot in names:
                attrs.pop(slot, None)
        for key in (*_CLASS_SKIP, "__slots__", "__module__", "__qualname__"):
            attrs.pop(key, None)
        metaclass = None if type(cls) is type else type(cls)
        bases = () if cls.__bases__ == (object,) else cls.__bases__
        return (
            new_class,
            (metaclass, cls.__name__, bases, creation),
            attrs,
            None,
            None,
            set_class_state,
        )


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY


def _portable(namespace: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in namespace.items() if k not in SKIPPED}


def dumps(namespace: dict[str, Any], sources: dict[str, str], protocol: int) -> bytes:
    """Pickle ``namespace`` so that another interpreter can rebuild it.

    ``sources`` maps the filename each input was compiled under to its text.

    Raises:
        pickle.PicklingError: something in it cannot move; the message names
            each such variable and why.
    """
    module_name = str(namespace.get("__name__", "__console__"))
    portable = _portable(namespace)
    try:
        return _dump(portable, sources, protocol, module_name, namespace)
    except Exception as exc:
        problems = []
        for key, value in portable.items():
            try:
                _dump({key: value}, sources, protocol, module_name, namespace)
            except Exception as item_exc:
                problems.append(f"{key} ({type(value).__name__}): {_reason(item_exc)}")
        if not problems:
            problems.append(_reason(exc))
        raise pickle.PicklingError("; ".join(problems)) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text


def _dump(
    value: dict[str, Any],
    sources: dict[str, str],
    protocol: int,
    module_name: str,
    namespace: dict[str, Any],
) -> bytes:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol, sources, module_name)
    pickler.globals_map[id(namespace)] = value
    pickler.dump(value)
    return buffer.getvalue()


def loads(load: GraphLoad, blob: bytes, sources: dict[str, str]) -> dict[str, Any]:
    """Rebuild a namespace pickled by :func:`dumps`, within the graph ``load``."""
    for filename, text in sources.items():
        register_source(filename, text)
    namespace = load.loads(blob)
    if not isinstance(namespace, dict):
        raise TypeError(f"a namespace must be a dict, not {type(namespace).__name__}")
    return namespace


def register_source(filename: str, source: str) -> None:
    """Let tracebacks show lines of ``source`` (compiled as ``filename``)."""
    lines = [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (len(source), None, lines, filename)
