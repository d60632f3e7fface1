"""The dry run: can a service's graph be pickled, and if not, what is in the way?

Before an originator pauses anything it pickles the service once and throws
the result away (:func:`check_graph`). Sockets become descriptor slots, so no
descriptor is touched. If that fails, :func:`find_unpicklable` walks the graph
the way pickle does and names the object at fault by its path::

    echo.connections[3].protocol.on_done: cannot pickle 'function' object (a lambda)

The walk follows what pickle follows, not ``__dict__``: the result of
``__reduce_ex__`` (so ``__getstate__`` is respected, and an attribute it
leaves out is not reported), its state dict and slot state (``.name``), its
arguments (``<arg N>``), list items (``[N]``) and dict items (``[key!r]``).
Lists, tuples, dicts, sets and frozensets are entered directly, bound methods
through ``.__self__`` and ``functools.partial`` through ``.func``, ``.args``
and ``.keywords``. A dict whose values are all None is an ordered set: its keys
are ``[N]``; other dict keys that fail are ``<key N>``, set items ``<item N>``.
A class may rename its attributes in paths with a ``_takeover_path_names``
dict (the asyncio server shows ``_transports`` as ``connections``, a
transport ``_protocol`` as ``protocol``).

Each object visited is checked on its own: it is pickled with every object it
refers to replaced by a placeholder, so the object reported is the deepest one
whose own pickling fails, not one of the containers above it. Objects are
remembered by id (cycles are walked once) and the walk stops descending below
:data:`MAX_DEPTH`.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import socket
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .pickling import GraphPickler, dumps

MAX_DEPTH = 1000
"""How deep the walk goes below the service object."""

ADVICE = (
    "leave it out of the pickled state with __getstate__ "
    "(and cancel a timer or task in takeover_quiesce, re-create it in takeover_adopted)"
)
"""What to do about an unpicklable object; the dry run runs before takeover_quiesce."""

_NEWOBJ = getattr(copyreg, "__newobj__", None)
_NEWOBJ_EX = getattr(copyreg, "__newobj_ex__", None)

_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    range,
    type(Ellipsis),
    type(NotImplemented),
)


@dataclass(frozen=True)
class Unpicklable:
    """Where a graph cannot be pickled.

    Attributes:
        path: the offending object's path, from the service name, e.g.
            ``echo.connections[3].protocol.on_done``.
        error: why it cannot be pickled, e.g. ``cannot pickle 'function'
            object (a lambda)``.
    """

    path: str
    error: str

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"

    def explain(self, service: str) -> str:
        """The message an originator sends when ``service`` cannot move."""
        return f"service {service!r} cannot move: {self}; {ADVICE}"


def check_graph(
    graph: Any,
    root: str,
    protocol: int = pickle.HIGHEST_PROTOCOL,
    sockets: list[socket.socket] | None = None,
    sizes: list[int] | None = None,
) -> Unpicklable | None:
    """Pickle ``graph`` as a move would and discard the result.

    Returns None if it pickles, else where and why it does not. ``root`` is
    the name paths start with (the service name). The graph's sockets, in
    pickling order, are appended to ``sockets`` if given, and its size in
    bytes to ``sizes``.
    """
    try:
        dumped = dumps(graph, protocol)
        if sockets is not None:
            sockets.extend(dumped.sockets)
        if sizes is not None:
            sizes.append(len(dumped.blob))
    except Exception as exc:  # whatever pickling raises, the graph cannot move
        found = find_unpicklable(graph, root, protocol)
        if found is not None:
            return found
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        return Unpicklable(root, _describe(graph, cause))
    return None


def find_unpicklable(
    graph: Any, root: str, protocol: int = pickle.HIGHEST_PROTOCOL, *, max_depth: int = MAX_DEPTH
) -> Unpicklable | None:
    """The first object, in pickling order, whose own pickling fails.

    None if every object reached (within ``max_depth``) pickles on its own.
    """
    seen: set[int] = set()
    keep: list[Any] = []  # keeps temporary objects alive so that ids stay unique
    stack: list[tuple[Any, str, int]] = [(graph, root, 0)]
    while stack:
        obj, path, depth = stack.pop()
        if type(obj) in _LEAVES:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        keep.append(obj)
        error = _own_pickling_error(obj, protocol)
        if error is not None:
            return Unpicklable(path, _describe(obj, error))
        if depth >= max_depth:
            continue
        try:
            children = list(_children(obj, protocol))
        except Exception:  # a __reduce_ex__ that fails only the second time
            continue
        keep.append(children)
        for label, child in reversed(children):
            stack.append((child, path + label, depth + 1))
    return None


class _ShallowPickler(GraphPickler):
    """Pickles one object, its references replaced by a placeholder.

    Sockets follow the graph pickler's rules (a TLS socket fails here too)
    and classes are pickled by reference as part of the object, so that an
    instance of a class that cannot be imported is the one at fault.
    """

    def __init__(self, file: io.BytesIO, protocol: int, root: Any) -> None:
        super().__init__(file, protocol)
        self._root = root
        self._root_seen = False

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, socket.socket):
            return None  # the graph pickler's own dispatch table checks it
        if obj is self._root and not self._root_seen:
            self._root_seen = True
            return None
        if isinstance(obj, type):
            return None
        return "child"


def _own_pickling_error(obj: Any, protocol: int) -> Exception | None:
    try:
        _ShallowPickler(io.BytesIO(), protocol, obj).dump(obj)
    except Exception as exc:
        return exc
    return None


def _describe(obj: Any, exc: Exception) -> str:
    what = "cannot pickle 'function' object"
    if isinstance(obj, types.FunctionType):
        if obj.__name__ == "<lambda>":
            return f"{what} (a lambda)"
        if "<locals>" in obj.__qualname__:
            return f"{what} (a function defined inside a function, {obj.__qualname__})"
    if isinstance(obj, type) and "<locals>" in obj.__qualname__:
        return f"cannot pickle class {obj.__qualname__} (defined inside a function)"
    if "<locals>" in type(obj).__qualname__:
        return (
            f"cannot pickle an instance of {type(obj).__qualname__} "
            "(its class is defined inside a function)"
        )
    if isinstance(exc, (TypeError, pickle.PicklingError)) or type(exc).__module__.startswith(
        "takeover"
    ):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _attribute(name: object, names: dict[str, str]) -> str:
    if isinstance(name, str):
        name = names.get(name, name)
        if name.isidentifier():
            return f".{name}"
    return f".__dict__[{name!r}]"


def _items(items: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for index, item in enumerate(items):
        yield f"[{index}]", item


def _dict_items(mapping: Iterable[tuple[Any, Any]]) -> Iterator[tuple[str, Any]]:
    pairs = list(mapping)
    as_set = bool(pairs) and all(value is None for _key, value in pairs)
    for index, (key, value) in enumerate(pairs):
        yield (f"[{index}]" if as_set else f"<key {index}>"), key
        if not as_set:
            yield f"[{key!r}]", value


def _state_items(state: Any, names: dict[str, str]) -> Iterator[tuple[str, Any]]:
    if isinstance(state, dict):
        for key, value in state.items():
            yield _attribute(key, names), value
    elif (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    ):
        # (instance dict, slot state), as object.__reduce_ex__ makes for __slots__.
        for part in state:
            yield from _state_items(part or {}, names)
    elif state is not None:
        yield "<state>", state


def _children(obj: Any, protocol: int) -> Iterator[tuple[str, Any]]:
    """What pickle saves for ``obj``, each with its path component."""
    kind = type(obj)
    if kind in (list, tuple):
        yield from _items(obj)
        return
    if kind is dict:
        yield from _dict_items(obj.items())
        return
    if kind in (set, frozenset):
        for index, item in enumerate(obj):
            yield f"<item {index}>", item
        return
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, socket.socket)):
        return  # pickled by reference, or a descriptor slot
    if isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        return
    names: dict[str, str] = getattr(kind, "_takeover_path_names", None) or {}
    if isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield from ((f".args{label}", arg) for label, arg in _items(obj.args))
        yield from ((f".keywords[{k!r}]", v) for k, v in (obj.keywords or {}).items())
        yield from _state_items(getattr(obj, "__dict__", None) or {}, names)
        return
    reducer = GraphPickler._BASE_TABLE.get(kind)
    reduced = reducer(obj) if reducer is not None else obj.__reduce_ex__(protocol)
    if isinstance(reduced, str):
        return  # a global
    func, args, state, listitems, dictitems = (*reduced, None, None, None, None)[:5]
    keywords: dict[str, Any] = {}
    if func is _NEWOBJ:
        args = args[1:]  # the class: part of the object's own pickling
    elif func is _NEWOBJ_EX:
        _cls, args, keywords = args
    else:
        yield "<reduce>", func
    for index, arg in enumerate(args or ()):
        yield f"<arg {index}>", arg
    for key, value in keywords.items():
        yield f"<arg {key}>", value
    yield from _state_items(state, names)
    if listitems is not None:
        yield from _items(listitems)
    if dictitems is not None:
        yield from _dict_items(dictitems)
