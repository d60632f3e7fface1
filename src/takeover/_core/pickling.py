"""The only module that pickles or unpickles a service graph.

A service graph is pickled in one pass. Some objects get special treatment:

* **sockets** become descriptor slots, ``_socket_slot(slot, family, type,
  proto)`` (SOCK_NONBLOCK in the type when the socket is non-blocking):
  their descriptors are collected in slot order and travel over SCM_RIGHTS,
  those the dry run found ahead of the graph (see ``ahead``); the recipient
  rebuilds each socket around the descriptor in its slot. The kernel object
  is never copied, so kernel buffers and connection state are untouched.
* **modules** travel by name and are imported again on the other side.
* **bound methods** travel as ``_bound_method(obj, name)``, not as
  ``getattr(obj, name)``.
* **twins**: an object that stands for a socket sent ahead and carries
  nothing else (an idle asyncio transport) is not pickled at all: both
  picklers' memos start with it (see ``ahead.SocketsAhead`` and
  ``ahead.Twins``).

Classes of the originator's script (``__main__.X``) resolve to the script
that the graph names (see ``script``).

The recipient rebuilds only what its :class:`~takeover._core.policy.UnpicklePolicy`
allows: every global the pickle names is checked there, so a graph cannot
call ``os.system`` or ``eval``. The reconstructors above need the load in
progress (its policy, its descriptors, its script): the unpickler resolves
their names to the methods of that load's :class:`GraphLoad`, so nothing of
a load lives in a module global, and a reconstructor called outside a load
fails. Another module's reconstructor that needs the load is marked with
:func:`needs_load` and gets the load as its first argument.

Where the recipient can't rebuild something (a class it can't import, a
descriptor missing) the error names it and every descriptor received is
closed, so that the originator can roll back with nothing leaked here.
"""

from __future__ import annotations

import _socket
import contextlib
import copyreg
import functools
import gc
import importlib
import io
import pickle
import socket
import struct
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

from .errors import MigrationRefusedError, ProtocolError, SerializationError
from .fds import close_all
from .policy import UnpicklePolicy, lookup
from .script import MAIN_NAMES, load_main

if TYPE_CHECKING:
    from .ahead import SocketsAhead

F = TypeVar("F", bound=Callable[..., Any])


# The reconstructors the pickler names. On a recipient the unpickler resolves
# each name to the load's own method (see GraphUnpickler.find_class), so
# these bodies run only if something calls them outside a load.


def _import_module(name: str) -> types.ModuleType:
    """A module reference: ``GraphLoad.import_module`` on the recipient."""
    raise _outside_a_load()


def _bound_method(owner: Any, name: str) -> Any:
    """A bound method: ``GraphLoad.bound_method`` on the recipient."""
    raise _outside_a_load()


def _socket_slot(slot: int, family: int, kind: int, proto: int) -> socket.socket:
    """A socket sent with the graph: ``GraphLoad.socket_slot`` on the recipient."""
    raise _outside_a_load()


def _socket_ahead(slot: int) -> socket.socket:
    """A socket sent ahead of the graph: the unpickler's own ``dict.pop`` on the recipient."""
    raise _outside_a_load()


def _repaired_socket(state: dict[str, Any]) -> socket.socket:
    """A connection moved to another host, as its TCP_REPAIR state:
    ``GraphLoad.repaired_socket`` on the recipient."""
    raise _outside_a_load()


def _listening_socket(
    family: int, address: list[Any], backlog: int, options: dict[str, int]
) -> socket.socket:
    """A listener moved to another host, bound again there: ``GraphLoad.listening_socket``."""
    raise _outside_a_load()


def _outside_a_load() -> ProtocolError:
    return ProtocolError("a takeover reconstructor was called outside the load of a service graph")


# The functions marked with needs_load, by id. Kept here rather than as an
# attribute of each function, which a graph's BUILD could set on any function
# of the application it names.
_needs_load: dict[int, Callable[..., Any]] = {}


def needs_load(function: F) -> F:
    """Mark a reconstructor whose first argument is the :class:`GraphLoad` in progress.

    The unpickler passes it when the graph names the function (after the
    policy has accepted it), so such a function reaches the load's policy
    and script without a global.
    """
    _needs_load[id(function)] = function
    return function


def _reduce_module(module: types.ModuleType) -> tuple[Callable[..., Any], tuple[str]]:
    return (_import_module, (module.__name__,))


def _reduce_method(method: types.MethodType) -> tuple[Callable[..., Any], tuple[Any, str]]:
    return (_bound_method, (method.__self__, method.__func__.__name__))


def _reduce_builtin(function: Any) -> Any:
    owner = function.__self__
    if owner is None or isinstance(owner, types.ModuleType):
        return function.__reduce__()  # a module's function: by name, as pickle does
    return (_bound_method, (owner, function.__name__))


def _refuse_tls(sock: socket.socket) -> Any:
    # Its TLS session lives in this process's memory; the fd alone would give
    # the recipient a stream of ciphertext.
    raise SerializationError(f"cannot migrate TLS socket {sock!r}: TLS sessions cannot move yet")


_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_raw_proto = _socket.socket.proto.__get__
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def socket_kind(sock: socket.socket) -> tuple[int, int, int]:
    """(family, type, proto), read in C; SOCK_NONBLOCK in the type if non-blocking.

    The socket module's properties convert them to enums, in Python; the
    flag lets the recipient build the socket without a system call.
    """
    kind = _raw_type(sock)
    if sock.gettimeout() == 0.0:
        kind |= _SOCK_NONBLOCK
    return _raw_family(sock), kind, _raw_proto(sock)


def socket_ahead_reduction(slot: int) -> tuple[Callable[..., Any], tuple[int]]:
    """How a socket sent ahead in ``slot`` pickles."""
    return (_socket_ahead, (slot,))


@dataclass
class Dumped:
    """A pickled graph and the sockets whose descriptors travel with it."""

    blob: bytes
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        """The descriptors of :attr:`sockets`, in slot order."""
        return [s.fileno() for s in self.sockets]


_C_PICKLER = pickle.Pickler is not getattr(pickle, "_Pickler", None)


class GraphPickler(pickle.Pickler):
    # Sockets go through the dispatch table, looked up by type in C, rather
    # than a persistent_id hook, which pickle would call (in Python) for every
    # object of the graph: that hook was most of the pickling time.
    _BASE_TABLE: dict[Any, Any] = {
        **copyreg.dispatch_table,
        types.ModuleType: _reduce_module,
        types.MethodType: _reduce_method,
        types.BuiltinMethodType: _reduce_builtin,
    }

    def __init__(self, file: io.BytesIO, protocol: int, ahead: SocketsAhead | None = None) -> None:
        super().__init__(file, protocol)
        self.sockets: list[socket.socket] = []
        table = dict(self._BASE_TABLE)
        if ahead is None:
            table[socket.socket] = self._reduce_socket
        else:
            # Sockets sent ahead have their reduction ready: the lookup is a
            # dict's, in C; any other socket comes to _reduce_socket.
            self.sockets.extend(ahead.sockets)
            reductions = _Reductions(ahead.reductions, self._reduce_socket)
            table[socket.socket] = reductions.__getitem__
            if ahead.memo is not None:
                # Entry N is the twin of the socket in slot N (or a stand-in
                # never referred to): the recipient starts its memo the same
                # way. The C pickler copies what it is given; the pure-Python
                # one (PyPy) would add to it, so it gets a copy.
                self.memo = ahead.memo if _C_PICKLER else dict(ahead.memo)
        ssl = sys.modules.get("ssl")
        if ssl is not None:
            table[ssl.SSLSocket] = _refuse_tls
        self.dispatch_table = table

    def _reduce_socket(self, sock: socket.socket) -> Any:
        # Called once per socket object: pickle's memo answers for the next
        # reference to it.
        if sock.fileno() < 0:
            raise SerializationError(f"cannot migrate closed socket {sock!r}")
        slot = len(self.sockets)
        self.sockets.append(sock)
        return (_socket_slot, (slot, *socket_kind(sock)))


class _Reductions(dict):  # type: ignore[type-arg]
    """Ready reductions of the sockets sent ahead; others are reduced on demand."""

    def __init__(self, ready: dict[socket.socket, Any], reduce: Callable[[Any], Any]) -> None:
        super().__init__(ready)
        self._reduce = reduce

    def __missing__(self, sock: socket.socket) -> Any:
        reduction = self[sock] = self._reduce(sock)
        return reduction


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection while a graph is pickled or rebuilt.

    Both allocate one object after another and free nothing, which makes the
    collector run again and again over a heap that only grows; the pause
    pays for each run. Nested pauses are fine: only the outermost one turns
    the collector back on. The originator and the recipient hold one over the
    whole pause of a move, so that the collection owed for a large graph
    runs after the service is serving again, not inside the pause.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def dumps(
    graph: Any, protocol: int = pickle.HIGHEST_PROTOCOL, ahead: SocketsAhead | None = None
) -> Dumped:
    """Pickle ``graph``; sockets in it become descriptor slots.

    With ``ahead``, its sockets keep the first slots (they were sent ahead);
    ``Dumped.sockets`` lists them too, then the sockets found besides.

    Raises:
        SerializationError: something in the graph cannot be pickled.
    """
    buffer = io.BytesIO()
    return _dump(GraphPickler(buffer, protocol, ahead), buffer, graph)


def _dump(pickler: GraphPickler, buffer: io.BytesIO, graph: Any) -> Dumped:
    try:
        with gc_paused():
            pickler.dump(graph)
    except SerializationError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
        raise SerializationError(f"the service graph cannot be pickled: {exc}") from exc
    return Dumped(buffer.getvalue(), pickler.sockets)


def _refuse_setstate(module: types.ModuleType, state: Any) -> None:
    raise MigrationRefusedError(
        f"refused to change module {module.__name__}: a graph may not set a module's "
        "globals (pickle's BUILD on a module reference)"
    )


# The subclass of each module class that refuses BUILD (see GraphLoad.guard).
_guard_classes: dict[type, type] = {}


class GraphLoad:
    """One graph's load in progress: what its reconstructors need, and what it touched.

    Args:
        unpickler: the unpickler loading the graph (its socket slots).
        policy: which globals the graph may name.
        main: where the originator's script classes come from (see ``script``).
    """

    def __init__(self, unpickler: GraphUnpickler, policy: UnpicklePolicy, main: str | None):
        self.unpickler = unpickler
        self.policy = policy
        self.main = main
        # The script modules this load trusts as the application's.
        self.app: set[str] = set()
        if main is not None and main.startswith("module:") and not policy.main_refusal(main):
            self.app.add(main.partition(":")[2])
        self.guarded: list[tuple[types.ModuleType, type]] = []
        # Classes the graph named that are not the application's: their namespaces
        # as they were, to undo what BUILD's slot state may set on a class.
        self.classes: dict[int, tuple[type, dict[str, Any]]] = {}
        # The policy's verdict on each (class, method name) seen in this load.
        self.methods: dict[Any, str] = {}

    def import_module(self, name: str) -> types.ModuleType:
        """Rebuild a module reference (what ``_import_module`` stands for)."""
        if name in MAIN_NAMES:
            module = self.main_module()
            if module is None:
                raise MigrationRefusedError(
                    f"the graph refers to the originator's script module {name!r}, "
                    "but the originator sent no script path"
                )
            return self.guard(module)
        self.policy.check_module(name, self.app)
        return self.guard(importlib.import_module(name))

    def bound_method(self, owner: Any, name: str) -> Any:
        """Rebuild ``owner.name`` (what ``_bound_method`` stands for).

        Unlike ``getattr``, which pickle uses by default, this returns only a
        method of a class the policy trusts.
        """
        return self.policy.method(owner, name, self.app, self.methods)

    def socket_slot(self, slot: int, family: int, kind: int, proto: int) -> socket.socket:
        """The socket around the descriptor in ``slot`` (what ``_socket_slot`` stands for)."""
        return self.unpickler.socket_for(slot, family, kind, proto)

    def repaired_socket(self, state: Any) -> socket.socket:
        """What ``_repaired_socket`` stands for: see ``crosspickle.repaired_socket``."""
        from .crosspickle import repaired_socket

        return repaired_socket(self.unpickler, state)

    def listening_socket(self, family: Any, address: Any, backlog: Any, options: Any) -> Any:
        """What ``_listening_socket`` stands for: see ``crosspickle.listening_socket``."""
        from .crosspickle import listening_socket

        return listening_socket(self.unpickler, family, address, backlog, options)

    def loads(self, blob: bytes) -> Any:
        """Load a graph nested in this one (no descriptors), under the same policy and script."""
        return loads(blob, (), main=self.main, policy=self.policy)

    def main_module(self) -> types.ModuleType | None:
        """The originator's script, loaded here if the policy allows it (None: none was sent)."""
        if self.main is None:
            return None
        refused = self.policy.main_refusal(self.main)
        if refused is not None:
            raise MigrationRefusedError(
                f"refused to load the originator's script {self.main}: {refused}"
            )
        module = load_main(self.main)
        self.app.add(module.__name__)
        return module

    def guard(self, module: Any) -> types.ModuleType:
        """Make ``module`` refuse pickle's BUILD until the load is over.

        BUILD on an object without ``__setstate__`` updates its ``__dict__``: on
        a module, that would rewrite its globals (``builtins.isinstance``, the
        policy's own tables). So while the graph loads, a module it refers to
        belongs to a subclass whose ``__setstate__`` refuses; :meth:`finish`
        puts the original class back.
        """
        if self.policy.trust:
            return cast(types.ModuleType, module)
        if not isinstance(module, types.ModuleType):
            raise MigrationRefusedError(f"refused module {module!r}: it is not a module")
        original = type(module)
        if original in _guard_classes.values():
            return module  # an outer load guards it already
        guarded = _guard_classes.get(original)
        if guarded is None:
            namespace = {"__setstate__": _refuse_setstate, "__module__": __name__}
            guarded = _guard_classes[original] = type("GuardedModule", (original,), namespace)
        module.__class__ = guarded
        self.guarded.append((module, original))
        return module

    def watch(self, cls: type) -> None:
        """Remember ``cls``'s namespace, to undo what the graph may set on it."""
        if self.policy.guards(cls, self.app):
            self.classes.setdefault(id(cls), (cls, dict(vars(cls))))

    def finish(self) -> list[str]:
        """Undo what the graph set on classes and modules; name the classes it changed."""
        changed = []
        for cls, saved in self.classes.values():
            current = dict(vars(cls))
            if current.keys() == saved.keys() and all(current[k] is v for k, v in saved.items()):
                continue
            changed.append(f"{cls.__module__}.{cls.__qualname__}")
            for key in current.keys() - saved.keys():
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(cls, key)
            for key, value in saved.items():
                if current.get(key) is not value:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(cls, key, value)
        self.classes.clear()
        for module, original in reversed(self.guarded):
            module.__class__ = original
        self.guarded.clear()
        return changed


class Source:
    """An unpickler's input that can change between loads: seeds, then the graph."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.data.read(size)

    def readinto(self, buffer: Any) -> int:
        return self.data.readinto(buffer)

    def readline(self) -> bytes:
        return self.data.readline()


# One memo entry per seeded object: BININT index, BINPERSID, MEMOIZE, POP.
_SEED_ENTRY = struct.Struct("<cicc")
_seed_bodies: dict[int, bytes] = {}


def _seed_pickle(count: int) -> bytes:
    """A pickle that memoizes persistent objects 0..count-1, in order, in one frame."""
    body = _seed_bodies.get(count)
    if body is None:
        body = b"".join(_SEED_ENTRY.pack(b"J", i, b"Q", b"\x94") + b"0" for i in range(count))
        body += b"N."
        if count <= 1024:
            _seed_bodies[count] = body
    return b"\x80\x05\x95" + struct.pack("<Q", len(body)) + body


# The reconstructors that stand for a method of the load in progress.
_LOAD_METHODS = {
    "_import_module": "import_module",
    "_bound_method": "bound_method",
    "_socket_slot": "socket_slot",
    "_repaired_socket": "repaired_socket",
    "_listening_socket": "listening_socket",
}


class GraphUnpickler(pickle.Unpickler):
    """Loads a graph under a policy, with the descriptors that came with it.

    Slots ``0..len(ahead)-1`` are the sockets sent ahead, already built
    (``ahead`` holds those the graph has not used yet); the descriptors sent
    with the graph follow.
    """

    def __init__(
        self,
        file: io.BytesIO | Source,
        fds: Sequence[int],
        policy: UnpicklePolicy | None = None,
        ahead: Sequence[socket.socket] = (),
    ) -> None:
        super().__init__(file)
        self.source = file
        # Set on the instance, not defined on the class, so that a seed load
        # (see seed) can swap in a C function: pickle's own persistent_load
        # slot takes whatever is set here.
        self.persistent_load = _refuse_persistent  # type: ignore[method-assign]
        self.policy = policy if policy is not None else UnpicklePolicy()
        self.load_in_progress: GraphLoad | None = None
        # A move across hosts: the connections rebuilt in repair mode, with their
        # state (None: not such a move, whose reconstructors are then refused).
        self.repaired: list[tuple[socket.socket, dict[str, Any]]] | None = None
        # Sockets this load made (not received): closed if it fails.
        self.rebuilt: list[socket.socket] = []
        self.use(fds, ahead)

    def use(self, fds: Sequence[int], ahead: Sequence[socket.socket]) -> None:
        """Take these descriptors for the next load."""
        self.built_ahead = list(ahead)
        self.ahead: dict[int, socket.socket] = dict(enumerate(self.built_ahead))
        self.fds = list(fds)
        self.sockets: dict[int, socket.socket] = {}

    def seed(self, objects: Sequence[Any]) -> None:
        """Append ``objects`` to the memo, in order (the graph refers to them by index)."""
        if not isinstance(self.source, Source) or not objects:
            return
        self.source.data = io.BytesIO(_seed_pickle(len(objects)))
        # Persistent id N is objects[N]: a list lookup, in C.
        self.persistent_load = objects.__getitem__  # type: ignore[method-assign]
        try:
            self.load()
        finally:
            self.persistent_load = _refuse_persistent  # type: ignore[method-assign]

    def socket_for(self, slot: Any, family: Any, kind: Any, proto: Any) -> socket.socket:
        """The socket around the descriptor in ``slot`` (one per slot)."""
        sock = self.sockets.get(slot)
        if sock is not None:
            return sock
        if type(family) is not int or type(kind) is not int or type(proto) is not int:
            raise ProtocolError(f"malformed socket reference for slot {slot!r}")
        ahead = len(self.built_ahead)
        if type(slot) is not int or not 0 <= slot < ahead + len(self.fds):
            raise ProtocolError(
                f"the graph refers to descriptor slot {slot!r}, only "
                f"{ahead + len(self.fds)} arrived"
            )
        if slot < ahead:
            sock = self.ahead.pop(slot)
        else:
            sock = socket.socket(family, kind, proto, self.fds[slot - ahead])
        self.sockets[slot] = sock
        return sock

    def close_unused(self) -> None:
        """Close what arrived but is not in the graph."""
        for sock in self.ahead.values():
            sock.close()
        self.ahead.clear()
        ahead = len(self.built_ahead)
        close_all([fd for i, fd in enumerate(self.fds) if i + ahead not in self.sockets])
        self.fds = []  # closed or owned by a socket: never closed again by number

    def close_all(self) -> None:
        """Close everything that arrived (the graph is not going to be used)."""
        for sock in self.built_ahead:
            sock.close()
        for sock in self.sockets.values():
            sock.close()
        for sock in self.rebuilt:
            sock.close()
        self.rebuilt = []
        self.close_unused()

    def find_class(self, module: str, name: str) -> Any:
        load = self.load_in_progress
        if load is None:
            raise ProtocolError("a graph's global named outside its load")
        if module == __name__:
            if name == "_socket_ahead":
                # In C: each socket sent ahead is taken out as the graph uses it,
                # so a slot named twice fails and those left over are closed.
                return self.ahead.pop
            method = _LOAD_METHODS.get(name)
            if method is not None:
                return getattr(load, method)
        try:
            target = self._resolve(load, module, name)
        except MigrationRefusedError:
            raise
        except (ImportError, AttributeError) as exc:
            raise MigrationRefusedError(
                f"cannot import {module}.{name}: {type(exc).__name__}: {exc}"
            ) from exc
        marked = _needs_load.get(id(target))
        if marked is not None and marked is target:
            return functools.partial(marked, load)
        return target

    def _resolve(self, load: GraphLoad, module: str, name: str) -> Any:
        """``module.name`` if the policy accepts it; else raise naming it."""
        policy = self.policy
        if module in MAIN_NAMES:
            script = load.main_module()
            if script is None:
                raise MigrationRefusedError(
                    "the originator did not say where its __main__ classes come from"
                )
            target: Any = lookup(script, name, policy)
        elif policy.trust:
            return super().find_class(module, name)
        else:
            if not policy.may_import(module, load.app):
                raise policy.refusal(f"{module}.{name}", module)
            target = lookup(importlib.import_module(module), name, policy)
        policy.check_global(module, name, target, load.app)
        if isinstance(target, type):
            load.watch(target)
        return target


def _refuse_persistent(pid: Any) -> Any:
    raise ProtocolError(f"unknown persistent reference {pid!r} in the graph")


def loads(
    blob: bytes,
    fds: Sequence[int],
    *,
    main: str | None = None,
    policy: UnpicklePolicy | None = None,
    ahead: Sequence[socket.socket] = (),
    unpickler: GraphUnpickler | None = None,
    repaired: list[tuple[socket.socket, dict[str, Any]]] | None = None,
) -> Any:
    """Rebuild a graph from ``blob`` and the descriptors that came with it.

    ``repaired``: a move across hosts. The graph's connections are rebuilt
    from their TCP_REPAIR state, in repair mode, and listed there with it
    (the caller starts them at the commit); its listeners are bound again.
    Without it, a graph that names those reconstructors is refused.

    ``ahead`` are the sockets sent ahead of the graph (its first slots);
    ``fds`` are the descriptors sent with it, in the slots that follow.
    ``unpickler``, if given, is one built ahead whose memo is seeded with the
    twins of ``ahead`` (``ahead.Twins.unpickler``); the sockets left over are
    then closed by ``Twins.close_leftovers``, not here.

    ``policy`` says which globals the pickle may name (default: the strict
    :class:`~takeover._core.policy.UnpicklePolicy`, no ``--allow``).

    On success every descriptor belongs to a socket in the graph, or is
    closed if the graph did not use it. On failure all are closed.

    Raises:
        MigrationRefusedError: the graph cannot be rebuilt here, or names a
            global the policy refuses; the message names the class, function
            or module at fault.
        ProtocolError: the blob or its descriptor references are malformed.
    """
    seeded = unpickler is not None
    if unpickler is None:
        unpickler = GraphUnpickler(io.BytesIO(blob), fds, policy, ahead)
    else:
        assert isinstance(unpickler.source, Source)
        unpickler.source.data = io.BytesIO(blob)
        unpickler.use(fds, ahead)
        if policy is not None:
            unpickler.policy = policy
    unpickler.repaired = repaired
    load = unpickler.load_in_progress = GraphLoad(unpickler, unpickler.policy, main)
    try:
        with gc_paused():
            graph = unpickler.load()
        changed = load.finish()
        if changed:
            raise MigrationRefusedError(
                f"refused to change class {changed[0]}: a graph may set attributes only of "
                "its objects, not of takeover's or the standard library's classes"
            )
    except BaseException as exc:
        unpickler.close_all()
        error = _load_error(exc)
        if error is exc:
            raise
        raise error from exc
    finally:
        load.finish()
        unpickler.load_in_progress = None
    if not seeded:
        unpickler.close_unused()
    return graph


def _load_error(exc: BaseException) -> BaseException:
    """What a failed load raises: the error that says what went wrong."""
    if isinstance(exc, (MigrationRefusedError, ProtocolError)) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, KeyError) and isinstance(exc.args[0] if exc.args else None, int):
        return ProtocolError(
            f"the graph refers to socket slot {exc.args[0]} sent ahead, which did not "
            "arrive or is already in use"
        )
    return MigrationRefusedError(f"cannot rebuild the service graph: {type(exc).__name__}: {exc}")
