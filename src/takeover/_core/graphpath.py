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
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from .pickling import GraphPickler, dumps, gc_paused

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


def _stand_in() -> None:
    """What the dry run's pickle names in place of an object pickled later (never loaded)."""


def _stand_in_reduction(_obj: Any) -> tuple[Callable[[], None], tuple[()]]:
    return (_stand_in, ())


_GROUP = 32  # parts pickled between two looks at the clock


class _Size:
    """A file that counts what is written to it and keeps nothing."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)


class _SpreadPickler(GraphPickler):
    """The dry run's pickler: one memo over every slice, so each object is
    pickled once; a closed socket met while the service still runs is noted
    (its connection may have left the graph since the slice began), not fatal."""

    def __init__(self, file: Any, protocol: int) -> None:
        super().__init__(file, protocol)
        self.lenient = True
        self.met_closed = False

    def _reduce_socket(self, sock: socket.socket) -> Any:
        if self.lenient and sock.fileno() < 0:
            self.met_closed = True
            return _stand_in_reduction(sock)
        return super()._reduce_socket(sock)


class SpreadCheck:
    """The dry run in slices, so that a service with many connections keeps
    serving while it runs: :func:`check_graph` in one go holds the event loop
    for as long as the whole graph takes to pickle (tens of milliseconds at
    10,000 connections), which every client feels before the pause.

    ``parts`` are objects of the graph that can be pickled one slice at a
    time (a server's connections, from its ``takeover_parts()`` hook); each
    :meth:`step` pickles them for about ``turn`` seconds, and the last one
    pickles ``graph`` itself, with the same pickler: what the slices pickled
    is a memo reference by then. While the parts are pickled, ``graph`` stands
    for itself as a placeholder, so a part's reference to its server does not
    pull in the whole graph (what parts share besides does go into the first
    slice that reaches it). Nothing is paused, so the graph may change
    between slices; the pickle of the quiesced service is the final check,
    as it always was. A part that met a closed socket and is still among
    ``current_parts()`` at the end, or any error, makes the check
    :attr:`failed`: the caller runs :func:`check_graph`, which names the
    object at fault (or passes, the graph having changed since).
    """

    def __init__(
        self,
        graph: Any,
        parts: Sequence[Any],
        protocol: int = pickle.HIGHEST_PROTOCOL,
        current_parts: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.graph = graph
        self.parts = list(parts)
        self.protocol = protocol
        self.current_parts = current_parts
        self.failed: Exception | None = None
        self.sockets: list[socket.socket] = []
        self.size = 0
        self.slices = 0
        self._size = _Size()
        self._pickler = _SpreadPickler(self._size, protocol)
        self._table: dict[Any, Any] = dict(self._pickler.dispatch_table)
        self._pickler.dispatch_table = self._table
        self._own_reducer = self._table.get(type(graph))
        self._table[type(graph)] = _stand_in_reduction
        self._next = 0
        self._suspects: list[Any] = []

    def step(self, turn: float) -> bool:
        """Pickle for about ``turn`` seconds; True once the check is over."""
        self.slices += 1
        pickler, parts = self._pickler, self.parts
        deadline = time.monotonic() + turn
        try:
            with gc_paused():
                while self._next < len(parts):
                    group = parts[self._next : self._next + _GROUP]
                    self._next += len(group)
                    pickler.met_closed = False
                    pickler.dump(group)
                    if pickler.met_closed:
                        self._suspects.extend(self._holding_closed(group))
                    if time.monotonic() >= deadline:
                        return False
                self._finish()
        except Exception as exc:  # whatever pickling raises, check_graph says where
            self.failed = exc
        return True

    def _holding_closed(self, group: list[Any]) -> list[Any]:
        """The parts of ``group`` that reach a closed socket, each pickled on its own
        (rare: a connection closed since the dry run began)."""
        holding = []
        for part in group:
            probe = _SpreadPickler(_Size(), self.protocol)
            table: dict[Any, Any] = dict(probe.dispatch_table)  # its own socket reducer
            table[type(self.graph)] = _stand_in_reduction
            probe.dispatch_table = table
            probe.dump(part)
            if probe.met_closed:
                holding.append(part)
        return holding

    def _finish(self) -> None:
        pickler, graph = self._pickler, self.graph
        pickler.lenient = False
        if self._suspects:
            current = set(map(id, self.current_parts() if self.current_parts else ()))
            for part in self._suspects:
                if id(part) in current:
                    raise pickle.PicklingError(f"a closed socket in {part!r}")
        reducer = self._own_reducer
        if reducer is None:
            del self._table[type(graph)]
        else:
            self._table[type(graph)] = reducer
        reduced = reducer(graph) if reducer is not None else graph.__reduce_ex__(self.protocol)
        # The graph's own reduction: its state refers to the parts (memo hits)
        # and to everything else, pickled now.
        pickler.dump(reduced)
        self.sockets = pickler.sockets
        self.size = self._size.bytes


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
