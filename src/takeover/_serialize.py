"""The only module that pickles or unpickles.

A service graph is pickled in one pass. Two kinds of object get special
treatment:

* **sockets** become descriptor slots, ``_socket_slot(slot, family, type,
  proto)`` (SOCK_NONBLOCK in the type when the socket is non-blocking):
  their descriptors are collected in slot order and travel over SCM_RIGHTS,
  those the dry run found ahead of the pickle (:class:`EarlySockets`); the
  recipient rebuilds each socket around the descriptor in its slot. The
  kernel object is never copied, so kernel buffers and connection state are
  untouched.
* **modules** travel by name and are imported again on the other side.
* **twins**: an object that stands for a socket sent ahead and carries
  nothing else (an idle asyncio transport) is built on the recipient from
  its socket while the service still runs. Both sides start the move's
  pickle memo with those objects, one entry per socket sent ahead, so the
  graph refers to each with a memo GET and pickles only what it points to
  (see :class:`EarlySockets` and :class:`Twins`).

Classes defined in a script run as ``python app.py`` pickle as
``__main__.X``, and the recipient's ``__main__`` is another program. The graph
says where the script came from (``main_reference``): for ``python -m NAME``
the recipient imports NAME; for ``python app.py`` it loads that file, on
first use, as the module ``__takeover_main__``. Either way the script's ``if
__name__ == "__main__"`` block does not run, and ``__main__.X`` resolves
there. Objects rebuilt from a loaded file pickle as ``__takeover_main__.X``
when they move on, with the same path, so chains A -> B -> C work.

The recipient rebuilds only what its :class:`~takeover._policy.UnpicklePolicy`
allows: every global the pickle names is checked there (see ``_policy``), so
a graph cannot call ``os.system`` or ``eval``. Bound methods travel as
``_bound_method(obj, name)``, not as ``getattr(obj, name)``.

Where the recipient can't rebuild something (a class it can't import, a
descriptor missing) the error names it and every descriptor received is
closed, so that the originator can roll back with nothing leaked here.
"""

from __future__ import annotations

import _socket
import contextlib
import copyreg
import gc
import importlib
import importlib.util
import io
import itertools
import os
import pickle
import socket
import struct
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, cast

from . import _policy
from ._errors import MigrationRefusedError, ProtocolError, SerializationError
from ._fds import batches, close_all
from ._policy import UnpicklePolicy

MAIN_ALIAS = "__takeover_main__"
"""The module name under which a recipient loads the originator's script."""

_MAIN_NAMES = ("__main__", MAIN_ALIAS)


def _import_module(name: str) -> types.ModuleType:
    """Rebuild a module reference (the only constructor modules pickle to)."""
    if name in _MAIN_NAMES:
        module = _current_main()
        if module is None:
            raise MigrationRefusedError(
                f"the graph refers to the originator's script module {name!r}, "
                "but the originator sent no script path"
            )
        return _guard(module)
    policy = _load_state.policy
    policy.check_module(name, _load_state.app)
    return _guard(importlib.import_module(name))


def _refuse_setstate(module: types.ModuleType, state: Any) -> None:
    raise MigrationRefusedError(
        f"refused to change module {module.__name__}: a graph may not set a module's "
        "globals (pickle's BUILD on a module reference)"
    )


_guard_classes: dict[type, type] = {}


def _guard(module: Any) -> types.ModuleType:
    """Make ``module`` refuse pickle's BUILD until the load is over.

    BUILD on an object without ``__setstate__`` updates its ``__dict__``: on a
    module, that would rewrite its globals (``builtins.isinstance``, the
    policy's own tables). So while the graph loads, a module it refers to
    belongs to a subclass whose ``__setstate__`` refuses; ``loads`` puts the
    original class back.
    """
    if _load_state.policy.trust:
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
    _load_state.guarded.append((module, original))
    return module


def _bound_method(owner: Any, name: str) -> Any:
    """Rebuild a bound method ``owner.name`` (what bound methods pickle to).

    Unlike ``getattr``, which pickle uses by default, this returns only a
    method of a class the policy trusts.
    """
    state = _load_state
    return state.policy.method(owner, name, state.app, state.methods)


def _socket_slot(slot: int, family: int, kind: int, proto: int) -> socket.socket:
    """Rebuild a socket from the descriptor in ``slot`` of the load in progress."""
    unpickler = _load_state.unpickler
    if unpickler is None:
        raise ProtocolError("a socket slot outside the load of a service graph")
    sock: socket.socket = unpickler.socket_for(slot, family, kind, proto)
    return sock


def _socket_ahead(slot: int) -> socket.socket:
    """The socket sent ahead of the graph in ``slot`` (each slot once).

    Only its name matters: every graph load resolves it to the unpickler's
    own ``dict.pop`` of those sockets (see ``_GraphUnpickler.find_class``,
    before any policy), so that no Python runs per socket.
    """
    unpickler = _load_state.unpickler
    if unpickler is None:
        raise ProtocolError("a socket slot outside the load of a service graph")
    sock: socket.socket = unpickler.ahead.pop(slot)
    return sock


_policy.vet(_import_module, _bound_method, _socket_slot)


def _reduce_module(module: types.ModuleType) -> tuple[Callable[..., Any], tuple[str]]:
    return (_import_module, (module.__name__,))


def _reduce_method(method: types.MethodType) -> tuple[Callable[..., Any], tuple[Any, str]]:
    return (_bound_method, (method.__self__, method.__func__.__name__))


def _reduce_builtin(function: Any) -> Any:
    owner = function.__self__
    if owner is None or isinstance(owner, types.ModuleType):
        return function.__reduce__()  # a module's function: by name, as pickle does
    return (_bound_method, (owner, function.__name__))


def main_reference() -> str | None:
    """Where this process's script classes (``__main__.X``) come from.

    ``module:NAME`` when the script was run as ``python -m NAME`` (the
    recipient imports NAME), ``path:/abs/app.py`` when it was run as a file
    (the recipient loads that file), None when there is no such script.
    """
    alias_path = getattr(sys.modules.get(MAIN_ALIAS), "__file__", None)
    if isinstance(alias_path, str):
        return f"path:{os.path.abspath(alias_path)}"
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) and spec.name != "__main__":
        return f"module:{spec.name}"
    path = getattr(main, "__file__", None)
    if isinstance(path, str) and path.endswith(".py"):
        return f"path:{os.path.abspath(path)}"
    return None


@dataclass
class Dumped:
    """A pickled graph and the sockets whose descriptors travel with it."""

    blob: bytes
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self.sockets]


def _refuse_tls(sock: socket.socket) -> Any:
    # Its TLS session lives in this process's memory; the fd alone would give
    # the recipient a stream of ciphertext.
    raise SerializationError(f"cannot migrate TLS socket {sock!r}: TLS sessions cannot move yet")


_C_PICKLER = pickle.Pickler is not getattr(pickle, "_Pickler", None)


class _GraphPickler(pickle.Pickler):
    # Sockets go through the dispatch table, looked up by type in C, rather
    # than a persistent_id hook, which pickle would call (in Python) for every
    # object of the graph: that hook was most of the pickling time.
    _BASE_TABLE: dict[Any, Any] = {
        **copyreg.dispatch_table,
        types.ModuleType: _reduce_module,
        types.MethodType: _reduce_method,
        types.BuiltinMethodType: _reduce_builtin,
    }

    def __init__(self, file: io.BytesIO, protocol: int, early: EarlySockets | None = None) -> None:
        super().__init__(file, protocol)
        self.sockets: list[socket.socket] = []
        table = dict(self._BASE_TABLE)
        if early is None:
            table[socket.socket] = self._reduce_socket
        else:
            # Sockets sent ahead have their reduction ready: the lookup is a
            # dict's, in C; any other socket comes to _reduce_socket.
            self.sockets.extend(early.sockets)
            reductions = _Reductions(early.reductions, self._reduce_socket)
            table[socket.socket] = reductions.__getitem__
            if early.memo is not None:
                # Entry N is the twin of the socket in slot N (or a stand-in
                # never referred to): the recipient starts its memo the same
                # way. The C pickler copies what it is given; the pure-Python
                # one (PyPy) would add to it, so it gets a copy.
                self.memo = early.memo if _C_PICKLER else dict(early.memo)
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
        return (_socket_slot, (slot, *_socket_kind(sock)))


class _Reductions(dict):  # type: ignore[type-arg]
    """Ready reductions of the sockets sent ahead; others are reduced on demand."""

    def __init__(self, ready: dict[socket.socket, Any], reduce: Callable[[Any], Any]) -> None:
        super().__init__(ready)
        self._reduce = reduce

    def __missing__(self, sock: socket.socket) -> Any:
        reduction = self[sock] = self._reduce(sock)
        return reduction


def _socket_kind(sock: socket.socket) -> tuple[int, int, int]:
    """(family, type, proto), read in C; SOCK_NONBLOCK in the type if non-blocking.

    The socket module's properties convert them to enums, in Python; the
    flag lets the recipient build the socket without a system call.
    """
    kind = _raw_type(sock)
    if sock.gettimeout() == 0.0:
        kind |= _SOCK_NONBLOCK
    return _raw_family(sock), kind, _raw_proto(sock)


class EarlySockets:
    """The sockets a move sends ahead of its graph, while the service still runs.

    The dry run's pickle names every socket of the graph. Their descriptors
    go to the recipient before the service is paused, so that the recipient
    builds its socket objects and registers the connections with its poller
    outside the pause; the graph, pickled after quiescing, then refers to
    them by slot. Sockets closed since (see :meth:`forget_closed`) leave
    their slot unused; sockets opened since are sent after the graph.

    ``twins`` maps some of those sockets to the object that stands for each
    (an asyncio transport), and ``twin_kind`` names what builds such an object
    on the recipient from the socket alone. Then the recipient builds the
    twins as the sockets arrive, and both picklers' memos start with one
    entry per socket sent ahead: its twin, or a stand-in nobody refers to.
    The service says after quiescing which twins now carry more than their
    socket (:meth:`unfit`): those stand-ins stay, and they travel in full.
    """

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        twins: Mapping[socket.socket, Any] | None = None,
        twin_kind: str | None = None,
    ) -> None:
        self.sockets = [s for s in sockets if s.fileno() >= 0]
        self.reductions: dict[socket.socket, Any] = {}
        self.kinds: list[list[int]] = []
        twins = twins or {}
        self.twin_kind = twin_kind if twins and twin_kind else None
        # Pickle memo entries (id -> (index, object)), one per slot; None: no twins.
        self.memo: dict[int, tuple[int, Any]] | None = None
        self._slot_objects: list[Any] = []  # what memo entry N was made for
        if self.twin_kind is not None:
            self.memo = {}
        for slot, sock in enumerate(self.sockets):
            kind = _socket_kind(sock)
            self.reductions[sock] = (_socket_ahead, (slot,))
            twin = twins.get(sock) if self.memo is not None else None
            if self.memo is not None:
                if twin is None:
                    twin = object()  # kept alive by its memo entry
                    flag = 0
                else:
                    flag = 1
                self.memo[id(twin)] = (slot, twin)
                self._slot_objects.append(twin)
            else:
                flag = 0
            if self.kinds and self.kinds[-1][1:] == [*kind, flag]:
                self.kinds[-1][0] += 1
            else:
                self.kinds.append([1, *kind, flag])

    def unfit(self, objects: Sequence[Any]) -> None:
        """Twins in ``objects`` travel in full: their memo entries become stand-ins."""
        if self.memo is not None:
            for obj in objects:
                self._stand_in(obj)

    def _stand_in(self, obj: Any) -> None:
        """Put a stand-in in ``obj``'s memo entry, if it has one."""
        assert self.memo is not None
        entry = self.memo.pop(id(obj), None)
        if entry is not None:
            stand_in = object()  # kept alive by its memo entry
            self.memo[id(stand_in)] = (entry[0], stand_in)

    def batches(self, size: int) -> Iterator[tuple[list[int], list[list[int]]]]:
        """(descriptors, their kinds) in batches of at most ``size``."""
        runs = [list(k) for k in self.kinds]
        for batch in batches([s.fileno() for s in self.sockets], size):
            kinds: list[list[int]] = []
            need = len(batch)
            while need:
                take = min(need, runs[0][0])
                kinds.append([take, *runs[0][1:]])
                runs[0][0] -= take
                need -= take
                if not runs[0][0]:
                    runs.pop(0)
            yield batch, kinds

    def forget_closed(self) -> None:
        """Drop the reductions (and twins) of sockets closed since they were sent.

        The twin of a closed connection then pickles in full if anything
        still refers to it, and fails as any closed socket does, rather than
        arrive as a transport nobody owns.
        """
        for slot, sock in enumerate(self.sockets):
            if sock.fileno() < 0:
                self.reductions.pop(sock, None)
                if self.memo is not None:
                    self._stand_in(self._slot_objects[slot])


def build_sockets(fds: Sequence[int], kinds: Any) -> list[socket.socket]:
    """Socket objects for descriptors sent ahead, described by ``kinds``.

    ``kinds`` is ``[[count, family, type, proto, twin], ...]`` in descriptor
    order (what :class:`EarlySockets` sends; ``twin`` is 1 for a socket whose
    twin :class:`Twins` builds). On error every descriptor is closed.
    """
    built: list[socket.socket] = []
    try:
        if not isinstance(kinds, list) or not all(
            isinstance(k, list)
            and len(k) == 5
            and all(type(v) is int for v in k)
            and k[0] > 0
            and k[4] in (0, 1)
            for k in kinds
        ):
            raise ProtocolError(f"malformed socket kinds {kinds!r} for descriptors sent ahead")
        if sum(k[0] for k in kinds) != len(fds):
            raise ProtocolError(
                f"socket kinds describe {sum(k[0] for k in kinds)} descriptors, {len(fds)} arrived"
            )
        position = 0
        for count, family, kind, proto, _twin in kinds:
            for fd in fds[position : position + count]:
                built.append(socket.socket(family, kind, proto, fd))
            position += count
    except BaseException:
        for sock in built:
            sock.close()
        close_all(list(fds[len(built) :]))
        raise
    return built


_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_raw_proto = _socket.socket.proto.__get__
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


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
    graph: Any, protocol: int = pickle.HIGHEST_PROTOCOL, early: EarlySockets | None = None
) -> Dumped:
    """Pickle ``graph``; sockets in it become descriptor slots.

    With ``early``, its sockets keep the first slots (they were sent ahead);
    ``Dumped.sockets`` lists them too, then the sockets found besides.

    Raises:
        SerializationError: something in the graph cannot be pickled.
    """
    buffer = io.BytesIO()
    pickler = _GraphPickler(buffer, protocol, early)
    try:
        with gc_paused():
            pickler.dump(graph)
    except SerializationError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
        raise SerializationError(f"the service graph cannot be pickled: {exc}") from exc
    return Dumped(buffer.getvalue(), pickler.sockets)


# The script module the current load resolves __main__ against.
_main_state: dict[str, str | None] = {"reference": None}


@dataclass
class _LoadState:
    """The policy of the load in progress, and the script modules it trusts."""

    policy: UnpicklePolicy = field(default_factory=UnpicklePolicy)
    app: set[str] = field(default_factory=set)
    guarded: list[tuple[types.ModuleType, type]] = field(default_factory=list)
    # Classes the graph named that are not the application's: their namespaces
    # as they were, to undo what BUILD's slot state may set on a class.
    classes: dict[int, tuple[type, dict[str, Any]]] = field(default_factory=dict)
    # The policy's verdict on each (class, method name) seen in this load.
    methods: dict[Any, str] = field(default_factory=dict)
    # The unpickler whose descriptors socket slots refer to.
    unpickler: Any = None


def _restore_classes(state: _LoadState) -> list[str]:
    """Put back the attributes a graph set or added on the classes it named; name them."""
    changed = []
    for cls, saved in state.classes.values():
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
    return changed


_load_state = _LoadState()


def _current_main() -> types.ModuleType | None:
    reference = _main_state["reference"]
    if reference is None:
        return None
    refused = _load_state.policy.main_refusal(reference)
    if refused is not None:
        raise MigrationRefusedError(
            f"refused to load the originator's script {reference}: {refused}"
        )
    module = load_main(reference)
    _load_state.app.add(module.__name__)
    return module


def preload_main(reference: str, policy: UnpicklePolicy) -> None:
    """Load the originator's script ahead of a move, if the policy allows it.

    Loading runs the script's top level, which can take milliseconds; done
    before TAKE, it stays out of the service's pause. Any failure is left
    for the move itself to report, with the policy's or the loader's words.
    """
    if policy.main_refusal(reference) is not None:
        return
    try:
        load_main(reference)
    except (MigrationRefusedError, ProtocolError):
        pass


def load_main(reference: str) -> types.ModuleType:
    """The module that the originator's ``__main__`` classes resolve to here.

    ``module:NAME`` is imported by name (its ``__main__`` block does not run,
    since it is not ``__main__`` here). ``path:FILE`` is loaded once as
    ``__takeover_main__``; if this process's own ``__main__`` is that same
    file, it is used as is.
    """
    kind, _, path = reference.partition(":")
    if kind == "module":
        try:
            return importlib.import_module(path)
        except Exception as exc:
            raise MigrationRefusedError(
                f"cannot import the originator's main module {path}: {type(exc).__name__}: {exc}"
            ) from exc
    if kind != "path" or not path:
        raise ProtocolError(f"malformed main script reference {reference!r}")
    real = os.path.realpath(path)
    for name in (MAIN_ALIAS, "__main__"):
        module = sys.modules.get(name)
        existing = getattr(module, "__file__", None)
        if module is not None and existing and os.path.realpath(existing) == real:
            return module
    if MAIN_ALIAS in sys.modules:
        raise MigrationRefusedError(
            f"this process already loaded {sys.modules[MAIN_ALIAS].__file__} as the "
            f"originator's script and cannot load a second one ({path}); take services "
            "from different scripts in different recipients"
        )
    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, real)
    if spec is None or spec.loader is None:
        raise MigrationRefusedError(f"cannot load the originator's script {path}")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(real)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[MAIN_ALIAS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[MAIN_ALIAS]
        raise MigrationRefusedError(
            f"loading the originator's script {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


class _Source:
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


class _GraphUnpickler(pickle.Unpickler):
    def __init__(
        self,
        file: io.BytesIO | _Source,
        fds: Sequence[int],
        policy: UnpicklePolicy | None = None,
        prebuilt: Sequence[socket.socket] = (),
    ) -> None:
        super().__init__(file)
        self.source = file
        # Set on the instance, not defined on the class, so that a seed load
        # (see seed) can swap in a C function: pickle's own persistent_load
        # slot takes whatever is set here.
        self.persistent_load = self._persistent_socket  # type: ignore[method-assign]
        self.policy = policy if policy is not None else UnpicklePolicy()
        # Slots 0..len(prebuilt)-1 are the sockets sent ahead, already built
        # (``ahead`` holds those the graph has not used yet); the descriptors
        # sent with the graph follow.
        self.prebuilt = list(prebuilt)
        self.ahead: dict[int, socket.socket] = dict(enumerate(self.prebuilt))
        self.fds = list(fds)
        self.sockets: dict[int, socket.socket] = {}

    def use(
        self,
        blob: bytes,
        fds: Sequence[int],
        policy: UnpicklePolicy | None,
        prebuilt: Sequence[socket.socket],
    ) -> None:
        """Load ``blob`` next, with these descriptors (an unpickler built ahead, seeded)."""
        assert isinstance(self.source, _Source)
        self.source.data = io.BytesIO(blob)
        if policy is not None:
            self.policy = policy
        self.prebuilt = list(prebuilt)
        self.ahead = dict(enumerate(self.prebuilt))
        self.fds = list(fds)
        self.sockets = {}

    def seed(self, objects: Sequence[Any]) -> None:
        """Append ``objects`` to the memo, in order (the graph refers to them by index)."""
        if not isinstance(self.source, _Source) or not objects:
            return
        self.source.data = io.BytesIO(_seed_pickle(len(objects)))
        # Persistent id N is objects[N]: a list lookup, in C.
        self.persistent_load = objects.__getitem__  # type: ignore[method-assign]
        try:
            self.load()
        finally:
            self.persistent_load = self._persistent_socket  # type: ignore[method-assign]

    def _persistent_socket(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "socket"):
            raise ProtocolError(f"unknown persistent reference {pid!r} in the graph")
        _, slot, family, kind, proto = pid
        return self.socket_for(slot, family, kind, proto)

    def socket_for(self, slot: Any, family: Any, kind: Any, proto: Any) -> socket.socket:
        """The socket around the descriptor in ``slot`` (one per slot)."""
        sock = self.sockets.get(slot)
        if sock is not None:
            return sock
        if type(family) is not int or type(kind) is not int or type(proto) is not int:
            raise ProtocolError(f"malformed socket reference for slot {slot!r}")
        ahead = len(self.prebuilt)
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
        ahead = len(self.prebuilt)
        close_all([fd for i, fd in enumerate(self.fds) if i + ahead not in self.sockets])
        self.fds = []  # closed or owned by a socket: never closed again by number

    def close_all(self) -> None:
        """Close everything that arrived (the graph is not going to be used)."""
        for sock in self.prebuilt:
            sock.close()
        for sock in self.sockets.values():
            sock.close()
        self.close_unused()

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_socket_ahead":
            # In C: each socket sent ahead is taken out as the graph uses it,
            # so a slot named twice fails and those left over are closed.
            return self.ahead.pop
        policy = self.policy
        try:
            if module in _MAIN_NAMES:
                target: Any = _current_main()
                if target is None:
                    raise MigrationRefusedError(
                        "the originator did not say where its __main__ classes come from"
                    )
                target = _policy.lookup(target, name, policy)
            elif policy.trust:
                return super().find_class(module, name)
            else:
                if not policy.may_import(module, _load_state.app):
                    raise policy.refusal(f"{module}.{name}", module)
                target = _policy.lookup(importlib.import_module(module), name, policy)
            policy.check_global(module, name, target, _load_state.app)
            if isinstance(target, type) and policy.guards(target, _load_state.app):
                _load_state.classes.setdefault(id(target), (target, dict(vars(target))))
            return target
        except MigrationRefusedError:
            raise
        except (ImportError, AttributeError) as exc:
            raise MigrationRefusedError(
                f"cannot import {module}.{name}: {type(exc).__name__}: {exc}"
            ) from exc


# What builds the twins of each kind (see EarlySockets), imported on first use.
_TWIN_KINDS = {"asyncio": "takeover._aio_transport"}
_STAND_IN = object()  # the memo entry of a socket sent ahead that has no twin


class Twins:
    """The recipient's twins of the sockets sent ahead (see :class:`EarlySockets`).

    Built batch by batch as the sockets arrive, while the service still runs
    in the originator, and memoized in that order by the unpickler that will
    load the graph: memo entry N is the twin of the socket in slot N (or a
    stand-in). The graph's server gives each twin its protocol; a twin it
    does not claim (a connection closed in the meantime, or one that travelled
    in full) leaves its socket to :meth:`close_leftovers`.
    """

    def __init__(self, kind: Any, policy: UnpicklePolicy | None = None) -> None:
        module = _TWIN_KINDS.get(kind) if isinstance(kind, str) else None
        if module is None:
            raise ProtocolError(f"unknown kind of twin {kind!r} for the sockets sent ahead")
        runtime = importlib.import_module(module)
        self.kind: str = kind
        self.build: Callable[[Sequence[socket.socket]], list[Any]] = runtime.new_twins
        self.claimed: Callable[[Any], bool] = runtime.twin_claimed
        self.objects: list[Any] = []
        self.unpickler = _GraphUnpickler(_Source(), (), policy)

    def add(self, sockets: Sequence[socket.socket], flags: Sequence[int]) -> None:
        """Build the twins of a batch of sockets (flag 1: it has one) and memoize them."""
        if all(flags):
            objects = self.build(sockets)
        else:
            built = iter(self.build(list(itertools.compress(sockets, flags))))
            objects = [next(built) if flag else _STAND_IN for flag in flags]
        self.objects.extend(objects)
        self.unpickler.seed(objects)

    def close_leftovers(self) -> None:
        """Close what arrived that neither the graph nor a claimed twin holds.

        Called once the service runs (a loop over every twin, so not inside
        the pause), or after it has been discarded.
        """
        ahead, claimed = self.unpickler.ahead, self.claimed
        for slot, obj in enumerate(self.objects):
            if obj is not _STAND_IN and claimed(obj):
                ahead.pop(slot, None)
        self.unpickler.close_unused()


def loads(
    blob: bytes,
    fds: Sequence[int],
    *,
    main: str | None = None,
    policy: UnpicklePolicy | None = None,
    prebuilt: Sequence[socket.socket] = (),
    twins: Twins | None = None,
) -> Any:
    """Rebuild a graph from ``blob`` and the descriptors that came with it.

    ``prebuilt`` are the sockets sent ahead of the graph (its first slots);
    ``fds`` are the descriptors sent with it, in the slots that follow.
    ``twins``, if the originator sent some, were built from ``prebuilt``:
    the graph is loaded by their unpickler, whose memo starts with them, and
    the sockets left over are closed by :meth:`Twins.close_leftovers`, not
    here.

    ``policy`` says which globals the pickle may name (default: the strict
    :class:`~takeover._policy.UnpicklePolicy`, no ``--allow``).

    On success every descriptor belongs to a socket in the graph, or is
    closed if the graph did not use it. On failure all are closed.

    Raises:
        MigrationRefusedError: the graph cannot be rebuilt here, or names a
            global the policy refuses; the message names the class, function
            or module at fault.
        ProtocolError: the blob or its descriptor references are malformed.
    """
    global _load_state
    if twins is None:
        unpickler = _GraphUnpickler(io.BytesIO(blob), fds, policy, prebuilt)
    else:
        unpickler = twins.unpickler
        unpickler.use(blob, fds, policy, prebuilt)
        if len(twins.objects) != len(prebuilt):
            unpickler.close_all()
            raise ProtocolError(
                f"{len(twins.objects)} twins for {len(prebuilt)} sockets sent ahead"
            )
    previous = _main_state["reference"]
    previous_load = _load_state
    _main_state["reference"] = main
    _load_state = _LoadState(unpickler.policy)
    _load_state.unpickler = unpickler
    if main is not None and main.startswith("module:") and not unpickler.policy.main_refusal(main):
        _load_state.app.add(main.partition(":")[2])
    try:
        with gc_paused():
            graph = unpickler.load()
        changed = _restore_classes(_load_state)
        if changed:
            raise MigrationRefusedError(
                f"refused to change class {changed[0]}: a graph may set attributes only of "
                "its objects, not of takeover's or the standard library's classes"
            )
    except BaseException as exc:
        unpickler.close_all()
        if isinstance(exc, (MigrationRefusedError, ProtocolError)):
            raise
        if isinstance(exc, KeyError) and isinstance(exc.args[0] if exc.args else None, int):
            raise ProtocolError(
                f"the graph refers to socket slot {exc.args[0]} sent ahead, which did not "
                "arrive or is already in use"
            ) from exc
        if isinstance(exc, Exception):
            raise MigrationRefusedError(
                f"cannot rebuild the service graph: {type(exc).__name__}: {exc}"
            ) from exc
        raise
    finally:
        _restore_classes(_load_state)
        for module, original in reversed(_load_state.guarded):
            module.__class__ = original
        _main_state["reference"] = previous
        _load_state = previous_load
    if twins is None:
        unpickler.close_unused()
    return graph
